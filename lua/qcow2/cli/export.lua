--- qcow2 export: the guest disk (or a snapshot's view) as a sparse raw
-- file: unallocated and zero ranges, and all-zero 4 KiB blocks inside
-- data, become holes, as qemu-img convert -O raw leaves them.
local util = require "qcow2.cli.util"

local CHUNK = 4 << 20          -- bytes read at a time
local WINDOW = 1 << 30         -- guest bytes mapped at a time
local BLOCK = 4096             -- qemu-img convert's default sparse size (-S 4k)

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- Write the non-zero 4 KiB blocks of data (guest offset `at`) to f: each
-- run of them in one write, the zero blocks skipped (holes).
local function write_sparse(f, at, data)
  local pos, n = 1, #data
  while pos <= n do
    local first = data:find("[^\0]", pos)
    if not first then return end
    -- start of the block holding the first non-zero byte (blocks aligned
    -- in guest offsets)
    local bstart = first - ((at + first - 1) % BLOCK)
    if bstart < pos then bstart = pos end
    -- extend the run while blocks hold non-zero bytes
    local bend = bstart - 1
    repeat
      local next_end = math.min(n, bend + BLOCK - ((at + bend) % BLOCK))
      local nz = data:find("[^\0]", bend + 1)
      if not nz or nz > next_end then break end
      bend = next_end
    until bend >= n
    util.check(f:seek("set", at + bstart - 1))
    util.check(f:write(data:sub(bstart, bend)))
    pos = bend + 1
  end
end

return {
  summary = "write the guest disk as a sparse raw file",
  usage = [[
usage: qcow2 export [--snapshot NAME] IMG OUT.raw

Writes the guest bytes of IMG (through its backing chain), or of an
internal snapshot's view, to OUT.raw: the same bytes as `qemu-img convert
-O raw`, and as sparse (unallocated, zero and all-zero 4 KiB ranges are
left as holes). OUT.raw is replaced. IMG is opened read-only.]],
  options = {
    ["--snapshot"] = { arg = true }, ["-l"] = { arg = true, alias = "--snapshot" },
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    if #args ~= 2 then util.usage("export takes IMG OUT.raw") end
    local img <close> = util.open(args[1], { key = opts.key, force_share = opts["-U"] or nil })
    local view = img
    if opts["--snapshot"] then view = util.snapshot_view(img, opts["--snapshot"]) end
    local size = view.size
    local f <close> = util.check(io.open(args[2], "wb"))
    local update, finish = util.progress(ctx, "export " .. args[1], size)
    for win = 0, size - 1, WINDOW do
      local m = util.check(view:map(win, math.min(WINDOW, size - win)))
      for e in m:extents() do
        if e.type ~= "zero" and e.type ~= "unallocated" then
          local at, stop = e.start, e.start + e.length
          while at < stop do
            local n = math.min(CHUNK, stop - at)
            write_sparse(f, at, util.check(view:read(at, n)))
            at = at + n
            update(at)
          end
        end
      end
      update(math.min(win + WINDOW, size))
    end
    util.check(f:close())
    finish()
    -- the file's size without writing its last bytes (a hole at the end)
    local ok = os.execute(("truncate -s %d -- %s"):format(size, shell_quote(args[2])))
    if not ok then util.fail(args[2] .. ": could not set the file size") end
    return 0
  end,
}
