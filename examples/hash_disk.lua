-- Hash the guest disk of an evidence image (and each internal snapshot)
-- without writing a byte to it or its backing files.
--   lua5.4 examples/hash_disk.lua evidence.qcow2 [sha256|sha1|md5]
local qcow2 = require "qcow2"
local path, algo = arg[1], arg[2] or "sha256"
if not path then io.stderr:write("usage: hash_disk.lua IMAGE [ALGO]\n") os.exit(2) end

local img <close>, err, code = qcow2.open(path, { mode = "r" })
if not img then io.stderr:write(("%s (%s)\n"):format(err, code)) os.exit(1) end
print(("%s  %s  active"):format(img:digest(algo), path))
for _, s in ipairs(img:snapshots()) do
  local view <close> = s:open()
  print(("%s  %s  snapshot %s (%s)"):format(view:digest(algo), path, s.id, s.name))
end
