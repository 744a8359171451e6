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

-- Read [at, at + n) of view and write it sparse; with on_error "zero" a
-- read refused because of damaged metadata ("corrupt") is retried one
-- cluster at a time and the clusters that still fail stay holes (zeroes)
-- and are returned as {start=, length=, reason=} ranges.
local function copy_range(view, f, at, n, zero, damage)
  local data, msg, code = view:read(at, n)
  if data then return write_sparse(f, at, data) end
  if not zero or code ~= "corrupt" then util.fail(tostring(msg)) end
  local cs = view.cluster_size or 65536
  local pos, stop = at, at + n
  while pos < stop do
    local len = math.min(cs - pos % cs, stop - pos)
    local piece, why, c = view:read(pos, len)
    if piece then
      write_sparse(f, pos, piece)
    elseif c == "corrupt" then
      local last = damage[#damage]
      if last and last.start + last.length == pos and last.reason == why then
        last.length = last.length + len
      else
        damage[#damage + 1] = { start = pos, length = len, reason = why }
      end
    else
      util.fail(tostring(why))
    end
    pos = pos + len
  end
end

return {
  summary = "write the guest disk as a sparse raw file",
  usage = [[
usage: qcow2 export [--snapshot NAME] [--on-error zero|fail] IMG OUT.raw

Writes the guest bytes of IMG (through its backing chain), or of an
internal snapshot's view, to OUT.raw: the same bytes as `qemu-img convert
-O raw`, and as sparse (unallocated, zero and all-zero 4 KiB ranges are
left as holes). OUT.raw is replaced. IMG is opened read-only.
--on-error fail (default) stops at a range whose metadata is damaged;
--on-error zero writes such ranges as zeroes (holes) and lists them on
stderr, one "unreadable START+LENGTH: REASON" line each.]],
  options = {
    ["--snapshot"] = { arg = true }, ["-l"] = { arg = true, alias = "--snapshot" },
    ["--on-error"] = { arg = true, choices = { "zero", "fail" } },
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    local zero, damage = opts["--on-error"] == "zero", {}
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
        if e.type == "corrupt" and zero then
          -- metadata that cannot be followed: a hole, reported
          damage[#damage + 1] = { start = e.start, length = e.length, reason = e.reason }
        elseif e.type ~= "zero" and e.type ~= "unallocated" then
          local at, stop = e.start, e.start + e.length
          while at < stop do
            local n = math.min(CHUNK, stop - at)
            copy_range(view, f, at, n, zero, damage)
            at = at + n
            update(at)
          end
        end
      end
      update(math.min(win + WINDOW, size))
    end
    util.check(f:close())
    finish()
    for _, d in ipairs(damage) do
      ctx.err:write(("qcow2: unreadable 0x%x+0x%x: %s\n"):format(d.start, d.length,
                                                                tostring(d.reason)))
    end
    -- the file's size without writing its last bytes (a hole at the end)
    local ok = os.execute(("truncate -s %d -- %s"):format(size, shell_quote(args[2])))
    if not ok then util.fail(args[2] .. ": could not set the file size") end
    return 0
  end,
}
