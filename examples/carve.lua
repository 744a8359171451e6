-- Carve the residue of an image: every byte range of the file that no
-- view of the disk reads (leaked or freed clusters, slack, the tail ...)
-- is written to OUTDIR/0xOFFSET-KIND.bin, read with img:raw_read.
--   lua5.4 examples/carve.lua evidence.qcow2 carved/
local qcow2 = require "qcow2"

local path, outdir = arg[1], arg[2]
if not path or not outdir then io.stderr:write("usage: carve.lua IMAGE OUTDIR\n") os.exit(2) end
local img <close> = assert(qcow2.open(path, { mode = "r" }))
assert(os.execute("mkdir -p '" .. outdir:gsub("'", "'\\''") .. "'"))

local CHUNK = 1 << 20
for _, r in ipairs(assert(img:residue())) do
  local name = ("%s/0x%08x-%s.bin"):format(outdir, r.offset, r.kind)
  local f <close> = assert(io.open(name, "wb"))
  for at = r.offset, r.offset + r.length - 1, CHUNK do
    f:write(assert(img:raw_read(at, math.min(CHUNK, r.offset + r.length - at))))
  end
  print(("%s  %d bytes  entropy %.2f"):format(name, r.length, r.entropy))
end
