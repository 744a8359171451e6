-- Read-only proof: mode "r" never writes a byte to the image or to its
-- backing files, even when the image is dirty, carries the corrupt bit or
-- unknown autoclear bits; every writing method refuses with "readonly".
local h = require("helpers")
local corpus = require("corpus")
local qcow2 = require("qcow2")

-- The cases: the files that must stay untouched, and the image to open.
local cases = {
  { name = "a dirty lazy-refcount image", build = function(d)
      local p = corpus.lazy_dirty(d)
      return p, { p }
    end },
  { name = "an image with the corrupt bit set", build = function(d)
      local p = corpus.corrupt_bit(d)
      return p, { p }
    end },
  { name = "an image with an unknown autoclear bit", build = function(d)
      local p = corpus.unknown_autoclear(d)
      return p, { p }
    end },
  { name = "a raw <- qcow2 <- qcow2 chain", chain = true, build = function(d)
      local c = corpus.chain(d)
      h.qemu_img("snapshot -c chained " .. h.q(c.top))
      h.qemu_io(c.top, { "write -P 0x3c 64k 64k" })
      return c.top, { c.top, c.mid, c.base }
    end },
}

-- Read-only operations, each given an open Image (and its path); every
-- one must leave every file as it was.
local function read_everything(img)
  assert(img:read(0, img.size))
  for _, r in ipairs(corpus.odd_ranges(img.cluster_size or 65536, img.size)) do
    assert(img:read(r[1], r[2]))
  end
end

local operations = {
  { "open and close", function(img) assert.is_true(img.read_only) end },
  { "reading everywhere", read_everything },
  { "map", function(img)
      local m = assert(img:map())
      assert(m:to_json())
      assert(m:stats())
      for _ in m:extents() do end
      assert(img:map(1000, 300000))
    end },
  { "info", function(img) assert.are.equal("table", type(img:info())) end },
  { "header", function(img) assert.are.equal("table", type(img:header())) end },
  { "snapshots", function(img)
      local list = img:snapshots()
      assert.is_true(#list >= 1)
      for _, s in ipairs(list) do
        assert(tostring(s))
        assert(img:snapshot(s.id))
        assert(img:snapshot(s.name))
        assert(s:map():to_json())
      end
    end },
  { "snapshot views", function(img)
      for _, s in ipairs(img:snapshots()) do
        local view = assert(s:open())
        read_everything(view)
        assert(view:map():to_json())
        assert(view:digest())
        assert(view:info())
        view:close()
      end
    end },
  { "l1, l2 and refcount", function(img)
      local l1 = img:l1()
      for i = 0, #l1 - 1 do
        if l1[i + 1] & 0x00FFFFFFFFFFFE00 ~= 0 then assert(img:l2(i)) end
      end
      for c = 0, 40 do assert(img:refcount(c)) end
    end },
  { "digest", function(img)
      assert(img:digest())
      assert(img:digest("sha256", 1000, 200000))
    end },
  { "the backing chain's own handles", function(img)
      local b = img:backing()
      while b do
        read_everything(b)
        assert(b:info())
        assert(b:map())
        b = b:backing()
      end
    end },
  { "check without repair", function(img) assert(img:check()) end },
  { "closing twice", function(img) img:close(); img:close() end },
}

local function assert_untouched(before, files, after_what)
  for i, f in ipairs(files) do
    local now = corpus.fingerprint(f)
    assert.are.equal(before[i].sha256, now.sha256, f .. ": bytes changed by " .. after_what)
    assert.are.equal(before[i].stat, now.stat, f .. ": size or times changed by " .. after_what)
  end
end

for _, case in ipairs(cases) do
  describe("mode r on " .. case.name, function()
    local pristine, path0, files0
    setup(function()
      pristine = h.tmpdir()
      path0, files0 = case.build(pristine)
    end)
    teardown(function() h.cleanup() end)

    -- Each test gets its own copy of the files (so one test's damage cannot
    -- fail the next) and their fingerprints; returns path, files, before.
    local function fresh()
      local work = h.tmpdir()
      local function moved(p) return work .. "/" .. p:match("[^/]+$") end
      local files, before = {}, {}
      for i, f in ipairs(files0) do
        h.must("cp " .. h.q(f) .. " " .. h.q(moved(f)))
        files[i] = moved(f)
      end
      for i, f in ipairs(files) do before[i] = corpus.fingerprint(f) end
      -- a write of identical bytes still moves the times: make sure a later
      -- write cannot land within the clock's resolution of the copy
      h.must("sleep 0.02")
      return moved(path0), files, before
    end

    for _, op in ipairs(operations) do
      it("leaves every file untouched after " .. op[1], function()
        local path, files, before = fresh()
        local img = assert(qcow2.open(path))
        op[2](img)
        img:close()
        assert_untouched(before, files, op[1])
      end)
    end

    it("leaves every file untouched when handles are dropped and garbage-collected", function()
      local path, files, before = fresh()
      do
        local img = assert(qcow2.open(path))
        local m = img:map()
        local s = img:snapshots()[1]
        local view = s and s:open()
        local b = img:backing()
        assert(img:read(0, 4096))
        if view then assert(view:read(0, 4096)) end
        if b then assert(b:read(0, 4096)) end
        assert(#m >= 1)
      end
      collectgarbage()
      collectgarbage()
      assert_untouched(before, files, "garbage collection")
    end)

    it("leaves every file untouched when a handle is closed by <close>", function()
      local path, files, before = fresh()
      do
        local img <close> = assert(qcow2.open(path))
        assert(img:read(0, 65536))
      end
      assert_untouched(before, files, "__close")
    end)

    -- Writing methods on a read-only handle: nil, message, "readonly", and
    -- nothing written.
    local writers = {
      { "write", function(img) return img:write(0, "x") end },
      { "write_zeroes", function(img) return img:write_zeroes(0, 65536) end },
      { "write_zeroes with unmap", function(img) return img:write_zeroes(0, 65536, { unmap = true }) end },
      { "discard", function(img) return img:discard(0, 65536) end },
      { "write_compressed", function(img) return img:write_compressed(0, ("c"):rep(img.cluster_size)) end },
      { "resize", function(img) return img:resize(img.size * 2) end },
      { "create_snapshot", function(img) return img:create_snapshot("new") end },
      { "raw_write", function(img) return img:raw_write(0, "QFI\xfb") end },
      { "amend", function(img) return img:amend({ lazy_refcounts = false }) end },
      { "make_empty", function(img) return img:make_empty() end },
      { "save_vmstate", function(img) return img:save_vmstate(0, "state") end },
      { "Snapshot:apply", function(img) return img:snapshots()[1]:apply() end },
      { "Snapshot:delete", function(img) return img:snapshots()[1]:delete() end },
      { "write on a snapshot view", function(img)
          local view = assert(img:snapshots()[1]:open())
          local a, b, c = view:write(0, "x")
          view:close()
          return a, b, c
        end },
    }
    if case.chain then
      writers[#writers + 1] = { "write on the backing Image", function(img)
        return assert(img:backing()):write(0, "x")
      end }
      writers[#writers + 1] = { "write on the raw base Image", function(img)
        return assert(assert(img:backing()):backing()):write(0, "x")
      end }
    end
    for _, w in ipairs(writers) do
      it(w[1] .. " refuses with code readonly and writes nothing", function()
        local path, files, before = fresh()
        local img = assert(qcow2.open(path))
        local ok, msg, code = w[2](img)
        assert.is_nil(ok)
        assert.are.equal("string", type(msg))
        assert.are.equal("readonly", code)
        -- the handle still reads after the refusal
        assert(img:read(0, 4096))
        img:close()
        assert_untouched(before, files, w[1])
      end)
    end
  end)
end
