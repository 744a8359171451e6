-- Image locks shared with QEMU: the library takes the byte-range locks
-- QEMU 7.2's file driver takes, so real qemu-io/qemu-img processes and
-- library handles refuse each other's images as QEMU processes do.
-- qemu-io is the oracle: which bytes it locks, and what it refuses.
local h = require("helpers")
local qcow2 = require("qcow2")

local MiB = 1 << 20

-- ---- Watching locks -------------------------------------------------------

-- The file's identity as /proc/locks prints it ("fe:00:1234"): the locks
-- table is machine-wide, so the inode alone could match another disk's.
local function lock_id(path)
  local dev, ino = h.must("stat -c '%D %i' " .. h.q(path)):match("(%x+) (%d+)")
  dev = tonumber(dev, 16)
  local major, minor = (dev >> 8) & 0xfff, (dev & 0xff) | ((dev >> 12) & 0xfff00)
  return ("%02x:%02x:%s"):format(major, minor, ino)
end

-- The sorted bytes of every OFD lock on a file (/proc/locks lines:
-- "1: OFDLCK ADVISORY READ -1 fe:00:1234 100 101").
local function locks_on(path)
  local id, bytes = lock_id(path), {}
  for line in io.lines("/proc/locks") do
    local kind, lock_file, first, last =
      line:match("^%d+: (%S+) +%S+ +%S+ +%S+ (%S+) (%d+) (%d+)")
    if kind == "OFDLCK" and lock_file == id then
      for byte = tonumber(first), tonumber(last) do
        bytes[#bytes + 1] = byte
      end
    end
  end
  table.sort(bytes)
  return table.concat(bytes, " ")
end

-- The locks on each of `files` once they stop changing: qemu-io's prompt
-- comes before QEMU has settled every permission of the chain, and a busy
-- machine can show the moment in between.
local function settled_locks(files)
  local function snapshot()
    local t = {}
    for _, f in ipairs(files) do t[#t + 1] = f .. ": " .. locks_on(f) end
    return table.concat(t, "\n")
  end
  local last = snapshot()
  for _ = 1, 40 do
    os.execute("sleep 0.05")
    local now = snapshot()
    if now == last then break end
    last = now
  end
  local out = {}
  for line in (last .. "\n"):gmatch("(.-)\n") do out[#out + 1] = line end
  return out
end

-- A qemu-io process holding `path` (opened with `args`), fed through a
-- pipe: it keeps the image until stop() closes its stdin. `timeout` bounds
-- its life even if a test dies before stopping it.
local function hold_with_qemu_io(path, args)
  local out = path .. ".qemu-io.out"
  os.remove(out)
  local pipe = assert(io.popen(("unset LD_PRELOAD; exec timeout 60 qemu-io %s %s > %s 2>&1")
    :format(args, h.q(path), h.q(out)), "w"))
  local holder = {}
  function holder.stop()
    if pipe then pipe:close() end   -- EOF: qemu-io quits; close waits for it
    pipe = nil
  end
  -- Its prompt is printed once the image (and its locks) are open.
  for _ = 1, 400 do
    local f = io.open(out, "rb")
    local text = f and f:read("a") or ""
    if f then f:close() end
    if text:find("qemu-io> ", 1, true) then return holder end
    if text:find("can't open", 1, true) then
      holder.stop()
      error("qemu-io could not open " .. path .. ": " .. text, 2)
    end
    os.execute("sleep 0.05")
  end
  holder.stop()
  error("qemu-io did not open " .. path .. " within 20 s", 2)
end

-- Run a qemu tool; its exit status and output (stderr merged).
local function run(cmd)
  local ok, out = h.sh(cmd, true)
  return ok, out
end

local function qemu_io_write(path)
  return run("qemu-io -f qcow2 -c 'write -P 0x5a 0 4k' " .. h.q(path))
end

local function assert_busy(pattern, img, msg, code)
  assert.is_nil(img)
  assert.are.equal("busy", code)
  assert.is_truthy(msg:find(pattern), msg)
end

describe("image locks", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.cleanup() end)

  local function image(name, opts)
    local p = dir .. "/" .. name
    h.create(p, 16 * MiB, opts)
    return p
  end

  describe("take the bytes qemu-io takes", function()
    -- Each case: files to compare, how qemu-io opens the top image, how
    -- the library does.
    local cases = {
      { "a qcow2 image read-write", "", { mode = "rw" } },
      { "a qcow2 image read-only", "-r", {} },
      { "a qcow2 image with force_share (-U)", "-r -U", { force_share = true } },
      { "a raw image read-write", "-f raw", { mode = "rw", allow_raw = true }, raw = true },
      { "a raw image read-only", "-f raw -r", { allow_raw = true }, raw = true },
    }
    for _, case in ipairs(cases) do
      it("on " .. case[1], function()
        local p = dir .. "/x.img"
        if case.raw then h.truncate(p, MiB) else h.create(p, 16 * MiB) end
        local holder = hold_with_qemu_io(p, case[2])
        local theirs = settled_locks({ p })[1]:gsub("^.-: ", "")
        holder.stop()
        assert.are.equal("", locks_on(p))
        local img = assert(qcow2.open(p, case[3]))
        local mine = locks_on(p)
        img:close()
        assert.are_not.equal("", theirs)
        assert.are.equal(theirs, mine)
      end)
    end

    for _, case in ipairs({ { "read-write", "", { mode = "rw" } },
                            { "read-only", "-r", {} },
                            { "force_share", "-r -U", { force_share = true } } }) do
      it("on the backing file and the data file of a " .. case[1] .. " open", function()
        local base = image("base.qcow2")
        local top = dir .. "/top.qcow2"
        h.create(top, 16 * MiB, nil, base)
        local ext = image("ext.qcow2", "data_file=" .. dir .. "/ext.data")
        local files = { base, top, ext, dir .. "/ext.data" }
        local theirs, mine = {}, {}
        for _, p in ipairs({ top, ext }) do
          local holder = hold_with_qemu_io(p, case[2])
          for _, line in ipairs(settled_locks(files)) do theirs[#theirs + 1] = line end
          holder.stop()
          local img = assert(qcow2.open(p, case[3]))
          for _, f in ipairs(files) do mine[#mine + 1] = f .. ": " .. locks_on(f) end
          img:close()
        end
        assert.are.same(theirs, mine)
      end)
    end
  end)

  describe("a handle of the library", function()
    it("read-write: qemu-io and qemu-img refuse the image until it is closed", function()
      local p = image("x.qcow2")
      local img = assert(qcow2.open(p, { mode = "rw" }))
      local ok, out = qemu_io_write(p)
      assert.is_false(ok)
      assert.is_truthy(out:find('Failed to get "write" lock', 1, true), out)
      ok, out = run("qemu-img info " .. h.q(p))
      assert.is_false(ok)
      assert.is_truthy(out:find('Failed to get shared "write" lock', 1, true), out)
      -- -U still reads it, as from a running VM.
      assert.is_true((run("qemu-img info -U " .. h.q(p))))
      img:close()
      assert.is_true((qemu_io_write(p)))
    end)

    it("made by qcow2.create is read-write locked too", function()
      local p = dir .. "/new.qcow2"
      local img = assert(qcow2.create(p, { size = 16 * MiB }))
      local ok, out = qemu_io_write(p)
      assert.is_false(ok)
      assert.is_truthy(out:find('Failed to get "write" lock', 1, true), out)
      img:close()
      assert.is_true((qemu_io_write(p)))
    end)

    it("read-only: qemu-io may read but not write the image", function()
      local p = image("x.qcow2")
      local img = assert(qcow2.open(p))
      local ok, out = qemu_io_write(p)
      assert.is_false(ok)
      assert.is_truthy(out:find('Failed to get "write" lock', 1, true), out)
      assert.is_true((run("qemu-io -r -c 'read 0 4k' " .. h.q(p))))
      img:close()
    end)

    it("with force_share: qemu-io may write beside it", function()
      local p = image("x.qcow2")
      local img = assert(qcow2.open(p, { force_share = true }))
      local ok, out = qemu_io_write(p)
      assert.is_true(ok, out)
      img:close()
    end)

    it("read-write on a chain: qemu-io may not write the backing file", function()
      local base = image("base.qcow2")
      local top = dir .. "/top.qcow2"
      h.create(top, 16 * MiB, nil, base)
      local img = assert(qcow2.open(top, { mode = "rw" }))
      local ok, out = qemu_io_write(base)
      assert.is_false(ok)
      assert.is_truthy(out:find('Failed to get "write" lock', 1, true), out)
      img:close()
      assert.is_true((qemu_io_write(base)))
    end)
  end)

  describe("a qemu-io process", function()
    local holder
    after_each(function() if holder then holder.stop() end holder = nil end)

    it("holding the image read-write makes every open busy but force_share's", function()
      local p = image("x.qcow2")
      h.qemu_io(p, { "write -P 0x11 0 64k" })
      holder = hold_with_qemu_io(p, "")
      assert_busy("held by a writer", qcow2.open(p, { mode = "rw" }))
      assert_busy('Failed to get shared "write" lock.*reads may be inconsistent',
                  qcow2.open(p))
      local img = assert(qcow2.open(p, { force_share = true }))
      assert.are.equal(("\17"):rep(65536), img:read(0, 65536))
      img:close()
      holder.stop()
      img = assert(qcow2.open(p, { mode = "rw" }))
      img:close()
    end)

    it("holding the image read-only refuses writers, not readers", function()
      local p = image("x.qcow2")
      -- A read-write open past the lock would flag this bitmap in use.
      h.qemu_img("bitmap --add " .. h.q(p) .. " b0")
      local before_bytes, before_stat = h.sha256_file(p), h.stat(p)
      holder = hold_with_qemu_io(p, "-r")
      assert_busy("held by a reader that does not share writes",
                  qcow2.open(p, { mode = "rw" }))
      -- The refused open wrote nothing: locks come before any write.
      assert.are.equal(before_bytes, h.sha256_file(p))
      assert.are.same(before_stat, h.stat(p))
      assert(qcow2.open(p)):close()
      holder.stop()
      assert(qcow2.open(p, { mode = "rw" })):close()
    end)

    it("writing the backing file makes the top busy, naming the backing file", function()
      local base = image("base.qcow2")
      local top = dir .. "/top.qcow2"
      h.create(top, 16 * MiB, nil, base)
      holder = hold_with_qemu_io(base, "")
      assert_busy("backing file '[^']*base.qcow2': .*held by a writer", qcow2.open(top))
      assert(qcow2.open(top, { force_share = true })):close()
      assert(qcow2.open(top, { backing = false })):close()
    end)

    it("in use keeps qcow2.create from emptying the file", function()
      local p = image("x.qcow2")
      h.qemu_io(p, { "write -P 0x22 0 64k" })
      local before = h.sha256_file(p)
      holder = hold_with_qemu_io(p, "")
      assert_busy("held by a writer",
                  qcow2.create(p, { size = MiB, overwrite = true }))
      assert.are.equal(before, h.sha256_file(p))
    end)
  end)

  describe("two handles in one process", function()
    it("refuse a second writer and readers beside a writer", function()
      local p = image("x.qcow2")
      local w = assert(qcow2.open(p, { mode = "rw" }))
      assert_busy("held by a writer", qcow2.open(p, { mode = "rw" }))
      assert_busy("held by a writer", qcow2.open(p))
      -- A snapshot of what the writer flushed (later writes may not show).
      assert(w:write(0, ("\51"):rep(4096)))
      assert(w:flush())
      local shared = assert(qcow2.open(p, { force_share = true }))
      assert.are.equal(("\51"):rep(4096), shared:read(0, 4096))
      shared:close()
      w:close()
    end)

    it("let readers share and refuse a writer beside them", function()
      local p = image("x.qcow2")
      local r1 = assert(qcow2.open(p))
      local r2 = assert(qcow2.open(p))
      assert_busy("held by a reader that does not share writes",
                  qcow2.open(p, { mode = "rw" }))
      r1:close()
      assert_busy("held by a reader", qcow2.open(p, { mode = "rw" }))
      r2:close()
      assert(qcow2.open(p, { mode = "rw" })):close()
    end)

    it("release their locks on close and when collected", function()
      local p = image("x.qcow2")
      local img = assert(qcow2.open(p, { mode = "rw" }))
      assert.are_not.equal("", locks_on(p))
      img:close()
      assert.are.equal("", locks_on(p))
      img = assert(qcow2.open(p, { mode = "rw" }))   -- luacheck: ignore 311
      img = nil                                       -- luacheck: ignore 311
      collectgarbage()
      collectgarbage()
      assert.are.equal("", locks_on(p))
      assert(qcow2.open(p, { mode = "rw" })):close()
    end)
  end)

  it("force_share is for read-only opens (misuse raises)", function()
    local p = image("x.qcow2")
    assert.has_error(function() qcow2.open(p, { mode = "rw", force_share = true }) end)
  end)
end)
