-- img:rebase (safe and unsafe) against qemu-img rebase doing the same on
-- copies: the same guest bytes (qemu-img compare, raw exports), the same
-- backing name and format, qemu-img check clean on every image written,
-- and the handle's chain the new one afterwards.
local h = require("helpers")
local qcow2 = require("qcow2")

local MiB = 1024 * 1024

-- sha256 of the guest disk as qemu-img reads it (raw export)
local export_sha = h.export_sha256

local function same_guest(a, b)
  local ok, out = h.sh("qemu-img compare " .. h.q(a) .. " " .. h.q(b), true)
  assert(ok, "qemu-img compare " .. a .. " " .. b .. ":\n" .. out)
  assert.equal(export_sha(a), export_sha(b))
end

local clean = h.assert_clean

describe("img:rebase", function()
  local dir
  before_each(function()
    dir = h.tmpdir()
    -- old chain: base0 <- old; new backing: new (shares some data with old)
    h.create(dir .. "/base0.qcow2", 4 * MiB, "cluster_size=4096")
    h.qemu_io(dir .. "/base0.qcow2", { "write -P 0x10 0 1M", "write -P 0x11 3M 512k" })
    h.create(dir .. "/old.qcow2", 4 * MiB, "cluster_size=16384", "base0.qcow2")
    h.qemu_io(dir .. "/old.qcow2", { "write -P 0x20 512k 256k", "write -z 1536k 64k",
                                     "write -P 0x21 2M 3k" })
    h.create(dir .. "/new.qcow2", 4 * MiB, "cluster_size=65536")
    h.qemu_io(dir .. "/new.qcow2", { "write -P 0x10 0 512k", "write -P 0x30 1M 1M",
                                     "write -P 0x11 3M 256k" })
    h.must("head -c 3145728 /dev/urandom > " .. h.q(dir .. "/new.raw"))
    h.create(dir .. "/top.qcow2", 4 * MiB, "cluster_size=65536", "old.qcow2")
    h.qemu_io(dir .. "/top.qcow2", { "write -P 0x40 64k 4k", "write -z 1M 64k",
                                     "write -P 0x41 3100k 100k" })
  end)
  after_each(h.cleanup)

  -- our rebase on top.qcow2, qemu-img's on a copy; both compared
  local function both(args, backing, opts)
    local ours, theirs = dir .. "/top.qcow2", dir .. "/theirs.qcow2"
    h.copy(ours, theirs)
    local before = export_sha(ours)
    h.must("cd " .. h.q(dir) .. " && qemu-img rebase " .. args .. " theirs.qcow2")
    local img = assert(qcow2.open(ours, { mode = "rw" }))
    assert(img:rebase(backing, opts))
    img:close()
    clean(ours)
    same_guest(ours, theirs)
    local a, b = h.info_json(ours), h.info_json(theirs)
    assert.equal(b["backing-filename"], a["backing-filename"])
    assert.equal(b["backing-filename-format"], a["backing-filename-format"])
    return before, ours
  end

  it("safe, to another qcow2: guest bytes kept, as qemu-img rebase", function()
    local before, ours = both("-b new.qcow2 -F qcow2", "new.qcow2", { format = "qcow2" })
    assert.equal(before, export_sha(ours))
  end)

  it("safe, to a raw file smaller than the image", function()
    local before, ours = both("-b new.raw -F raw", "new.raw", { format = "raw" })
    assert.equal(before, export_sha(ours))
  end)

  it("safe, removing the backing file (everything copied in)", function()
    local before, ours = both("-b ''", "")
    assert.equal(before, export_sha(ours))
    assert.is_nil(h.info_json(ours)["backing-filename"])
  end)

  it("safe, onto the old backing's own backing file", function()
    local before, ours = both("-b base0.qcow2 -F qcow2", "base0.qcow2", { format = "qcow2" })
    assert.equal(before, export_sha(ours))
  end)

  it("safe, from no backing file to one", function()
    h.create(dir .. "/top.qcow2", 4 * MiB)
    h.qemu_io(dir .. "/top.qcow2", { "write -P 0x40 64k 4k" })
    local before, ours = both("-b new.qcow2 -F qcow2", "new.qcow2", { format = "qcow2" })
    assert.equal(before, export_sha(ours))
  end)

  it("safe, with extended L2 (subclusters of the overlay)", function()
    h.create(dir .. "/top.qcow2", 4 * MiB, "cluster_size=65536,extended_l2=on", "old.qcow2")
    h.qemu_io(dir .. "/top.qcow2", { "write -P 0x40 66k 2k", "write -z 1030k 8k" })
    local before, ours = both("-b new.qcow2 -F qcow2", "new.qcow2", { format = "qcow2" })
    assert.equal(before, export_sha(ours))
  end)

  it("safe, with many scattered ranges owned and not (lookups walked, not the map)", function()
    h.create(dir .. "/top.qcow2", 4 * MiB, "cluster_size=4096", "old.qcow2")
    local cmds = {}
    for i = 0, 60 do cmds[#cmds + 1] = ("write -P 0x%x %d 4k"):format(0x50 + i % 7, i * 61 * 1024) end
    cmds[#cmds + 1] = "write -z 2052k 12k"
    h.qemu_io(dir .. "/top.qcow2", cmds)
    local before, ours = both("-b new.qcow2 -F qcow2", "new.qcow2", { format = "qcow2" })
    assert.equal(before, export_sha(ours))
  end)

  it("a new backing file that cannot be read: refused, the image reads as before", function()
    local p = dir .. "/top.qcow2"
    local before = export_sha(p)
    -- new.qcow2's L2 entry for guest 0 (not the image's own) points at an
    -- unaligned host offset
    local ed = assert(qcow2.edit(dir .. "/new.qcow2"))
    local entry = assert(ed:l2(0))
    assert(ed:l2(0, entry + 512))
    ed:close()
    local img = assert(qcow2.open(p, { mode = "rw" }))
    local ok, msg, code = img:rebase("new.qcow2", { format = "qcow2" })
    assert.is_nil(ok)
    assert.equal("corrupt", code)
    assert.truthy(msg:find(dir .. "/new.qcow2", 1, true), msg)
    img:close()
    clean(p)
    assert.equal(before, export_sha(p))
    assert.equal("old.qcow2", h.info_json(p)["backing-filename"])
  end)

  it("a new backing file whose data cannot be read: refused, the image reads as before", function()
    local p = dir .. "/top.qcow2"
    local before = export_sha(p)
    -- a compressed cluster at guest 0 whose stream is garbage: its map is
    -- fine, its bytes (read on the helper thread) are not
    local bad = dir .. "/bad.qcow2"
    h.create(bad, 4 * MiB, "cluster_size=65536")
    h.qemu_io(bad, { "write -c -P 0x10 0 64k" })
    local bimg = assert(qcow2.open(bad))
    local m = bimg:map()
    bimg:close()
    assert.equal("compressed", m[1].type)
    h.poke(bad, m[1].offset, ("\255"):rep(256))
    local img = assert(qcow2.open(p, { mode = "rw" }))
    local ok, msg = img:rebase("bad.qcow2", { format = "qcow2" })
    assert.is_nil(ok)
    assert.truthy(msg:find("new backing file", 1, true), msg)
    img:close()
    clean(p)
    assert.equal(before, export_sha(p))
    assert.equal("old.qcow2", h.info_json(p)["backing-filename"])
  end)

  it("safe without a format records the probed one", function()
    local img = assert(qcow2.open(dir .. "/top.qcow2", { mode = "rw" }))
    assert(img:rebase("new.raw"))
    img:close()
    assert.equal("raw", h.info_json(dir .. "/top.qcow2")["backing-filename-format"])
  end)

  it("unsafe: the name and format only, as qemu-img rebase -u", function()
    local function own(path)
      local t = {}
      for _, e in ipairs(h.map_json(path)) do
        if e.depth == 0 then t[#t + 1] = ("%d+%d %s %s"):format(e.start, e.length, e.data, e.zero) end
      end
      return table.concat(t, "\n")
    end
    local was = own(dir .. "/top.qcow2")
    local _, ours = both("-u -b new.qcow2 -F qcow2", "new.qcow2", { format = "qcow2", unsafe = true })
    -- nothing copied in: the image's own clusters are as they were
    assert.equal(was, own(ours))
  end)

  it("unsafe to a missing file: the name is written, the chain left closed", function()
    local img = assert(qcow2.open(dir .. "/top.qcow2", { mode = "rw" }))
    assert(img:rebase("missing.qcow2", { format = "qcow2", unsafe = true }))
    assert.is_nil(img:backing())
    assert.equal("missing.qcow2", img.backing_file)
    img:close()
    local again <close> = assert(qcow2.open(dir .. "/top.qcow2", { backing = false }))
    assert.equal("missing.qcow2", again.backing_file)
    assert.equal("qcow2", again:info()["backing-filename-format"])
  end)

  it("leaves the handle on the new chain; the old backing Image is closed", function()
    local img = assert(qcow2.open(dir .. "/top.qcow2", { mode = "rw" }))
    local old = img:backing()
    local before = img:read(0, 4 * MiB)
    assert(img:rebase("new.qcow2", { format = "qcow2" }))
    assert.has_error(function() old:read(0, 1) end, "attempt to use a closed image")
    assert.equal(dir .. "/new.qcow2", img:backing().path)
    assert.equal(before, img:read(0, 4 * MiB))
    -- unallocated ranges of the overlay now read the new backing
    local m = img:map()
    local deep = 0
    for e in m:extents() do if e.depth == 1 and e.type == "data" then deep = deep + e.length end end
    assert.is_true(deep > 0)
    img:close()
  end)

  it("refuses without changing the image", function()
    local p = dir .. "/top.qcow2"
    local sha = h.sha256_file(p)
    local ro = assert(qcow2.open(p))
    local _, _, code = ro:rebase("new.qcow2", { format = "qcow2" })
    assert.equal("readonly", code)
    ro:close()
    local img = assert(qcow2.open(p, { mode = "rw", backing = false }))
    _, _, code = img:rebase("new.qcow2", { format = "qcow2" })
    assert.equal("unsupported", code)         -- safe needs the old chain
    img:close()
    img = assert(qcow2.open(p, { mode = "rw" }))
    _, _, code = img:rebase("nbd://host/x", { format = "raw" })
    assert.equal("unsupported", code)
    _, _, code = img:rebase("json:{}", { format = "raw" })
    assert.equal("unsupported", code)
    _, _, code = img:rebase("absent.qcow2", { format = "qcow2" })
    assert.equal("notfound", code)
    assert.has_error(function() img:rebase("new.qcow2", { fromat = "qcow2" }) end)
    assert.has_error(function() img:rebase("new.qcow2", { format = "vmdk" }) end)
    assert.has_error(function() img:rebase(1, { unsafe = "yes" }) end)
    local view = img:snapshots()[1]
    assert.is_nil(view)
    img:close()
    assert.equal(sha, h.sha256_file(p))
  end)
end)
