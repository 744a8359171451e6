-- Internal snapshots written by the library: create, apply, delete and the
-- VM-state area, with qemu-img (7.2) as the oracle for listings, contents
-- and consistency.
local h = require("helpers")
local qcow2 = h.qcow2()

local MiB = 1024 * 1024

-- qemu-img check exits 0 (no corruptions, no leaks).
local function assert_clean(path)
  local _, code = h.check_json(path)
  if code ~= 0 then
    local _, out = h.sh("qemu-img check " .. h.q(path), true)
    assert.are.equal(0, code, out)
  end
end

local function open_rw(path, extra)
  local opts = { mode = "rw" }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return assert(qcow2.open(path, opts))
end

-- The snapshots qemu-img info lists, by name.
local function oracle_snapshots(path)
  local list = {}
  for _, s in ipairs(h.info_json(path).snapshots or {}) do list[s.name] = s end
  return list
end

-- The library's listing matches qemu-img's field by field.
local function assert_same_listing(path)
  local theirs = oracle_snapshots(path)
  local img = assert(qcow2.open(path))
  local n = 0
  for _, s in ipairs(img:snapshots()) do
    n = n + 1
    local o = theirs[s.name]
    assert.is_truthy(o, "qemu-img does not list " .. s.name)
    assert.are.equal(o.id, s.id)
    assert.are.equal(o["date-sec"], s.date)
    assert.are.equal(o["date-nsec"], s.date_nsec)
    assert.are.equal(o["vm-state-size"], s.vm_state_size)
    assert.are.equal(o["vm-clock-sec"] * 1000000000 + o["vm-clock-nsec"], s.vm_clock)
    -- the row qemu-img snapshot -l prints
    local listing = h.qemu_img("snapshot -l " .. h.q(path))
    assert.is_truthy(listing:find(tostring(s), 1, true), tostring(s))
  end
  local count = 0
  for _ in pairs(theirs) do count = count + 1 end
  assert.are.equal(count, n)
  img:close()
end

-- Each snapshot's view reads as qemu-img convert -l snapshot.name=X does.
-- qemu-img keeps the current virtual size: a smaller snapshot is padded
-- with zeroes, a larger one cut, so the bytes compare up to the shorter.
local function assert_views_match(path)
  local img = assert(qcow2.open(path))
  for _, s in ipairs(img:snapshots()) do
    local view = assert(s:open())
    local mine = assert(view:read(0, view.size))
    view:close()
    assert.are.equal(s.disk_size, #mine)
    local theirs = h.raw_bytes(path, s.name)
    local common = math.min(#mine, #theirs)
    assert.is_true(mine:sub(1, common) == theirs:sub(1, common),
                   "view of " .. s.name)
    assert.is_true(theirs:sub(common + 1) == ("\0"):rep(#theirs - common))
  end
  img:close()
end

local function active_bytes(path)
  local img = assert(qcow2.open(path))
  local data = assert(img:read(0, img.size))
  img:close()
  return data
end

describe("Image:create_snapshot", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  it("records what qemu-img lists and keeps the disk as it was", function()
    local p = dir .. "/a.qcow2"
    h.create(p, 64 * MiB)
    h.qemu_io(p, { "write -P 0x11 0 1M", "write -c -P 0x22 2M 64k" })
    local img = open_rw(p)
    local s1 = assert(img:create_snapshot("one", {
      vm_clock = 3723004000000, date = 1700000000, date_nsec = 123000,
      vm_state = ("V"):rep(70000) }))
    assert.are.equal("1", s1.id)
    assert.are.equal(70000, s1.vm_state_size)
    assert.are.equal(64 * MiB, s1.disk_size)
    assert.are.equal(0, s1.icount)  -- what qemu-img writes offline
    img:close()
    assert_clean(p)
    h.qemu_io(p, { "write -P 0x33 512k 1M" })
    img = open_rw(p)
    local s2 = assert(img:create_snapshot("two"))
    assert.are.equal("2", s2.id)
    img:close()
    assert_clean(p)
    assert_same_listing(p)
    assert_views_match(p)
  end)

  it("numbers snapshots max(id)+1 as QEMU does, after qemu-img's", function()
    local p = dir .. "/ids.qcow2"
    h.create(p, 16 * MiB)
    h.qemu_img("snapshot -c q1 " .. h.q(p))
    h.qemu_img("snapshot -c q2 " .. h.q(p))
    h.qemu_img("snapshot -d q1 " .. h.q(p))
    local img = open_rw(p)
    assert.are.equal("3", assert(img:create_snapshot("mine")).id)
    img:close()
    h.qemu_img("snapshot -c q4 " .. h.q(p))
    assert.are.equal("4", oracle_snapshots(p).q4.id)
    assert_clean(p)
    assert_same_listing(p)
  end)

  it("refuses a duplicate name or id with \"exists\"", function()
    local p = dir .. "/dup.qcow2"
    h.create(p, 16 * MiB)
    local img = open_rw(p)
    assert(img:create_snapshot("one"))
    local ok, msg, code = img:create_snapshot("one")
    assert.is_nil(ok); assert.are.equal("exists", code); assert.is_string(msg)
    ok, msg, code = img:create_snapshot("1")
    assert.is_nil(ok); assert.are.equal("exists", code); assert.is_string(msg)
    img:close()
    assert_clean(p)
    assert.are.equal(1, #h.info_json(p).snapshots)
  end)

  it("refuses 1-bit refcounts with \"unsupported\"", function()
    local p = dir .. "/rc1.qcow2"
    h.create(p, 16 * MiB, "refcount_bits=1")
    h.qemu_io(p, { "write -P 0x11 0 128k" })
    local before = h.read_file(p)
    local img = open_rw(p)
    local ok, _, code = img:create_snapshot("one")
    assert.is_nil(ok); assert.are.equal("unsupported", code)
    img:close()
    assert_clean(p)
    assert.is_true(before == h.read_file(p))
  end)

  it("refuses every write on a read-only handle with \"readonly\"", function()
    local p = dir .. "/ro.qcow2"
    h.create(p, 16 * MiB)
    h.qemu_img("snapshot -c q " .. h.q(p))
    local before = h.read_file(p)
    local img = assert(qcow2.open(p))
    local function refused(ok, _, code)
      assert.is_nil(ok); assert.are.equal("readonly", code)
    end
    refused(img:create_snapshot("x"))
    refused(img:save_vmstate(0, "abc"))
    refused(img:snapshot("q"):apply())
    refused(img:snapshot("q"):delete())
    -- no VM state saved: nothing to read (spec/bounds_spec.lua)
    assert.are.equal("", assert(img:load_vmstate(0, 3)))
    img:close()
    assert.is_true(before == h.read_file(p))
  end)
end)

describe("Snapshot:apply and Snapshot:delete", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  it("go back to a snapshot and drop it, as qemu-img sees it", function()
    local p = dir .. "/a.qcow2"
    h.create(p, 64 * MiB)
    h.qemu_io(p, { "write -P 0x11 0 1M", "write -c -P 0x22 2M 64k" })
    local img = open_rw(p)
    assert(img:create_snapshot("one"))
    img:close()
    local at_one = h.raw_bytes(p)
    h.qemu_io(p, { "write -P 0x33 512k 1M", "write -P 0x44 40M 64k" })
    img = open_rw(p)
    assert(img:create_snapshot("two"))
    local one = img:snapshot("one")
    assert.is_true(assert(one:apply()))
    assert.is_true(img:read(0, img.size) == at_one)
    img:close()
    assert_clean(p)
    assert.is_true(h.raw_bytes(p) == at_one)
    assert_views_match(p)

    img = open_rw(p)
    one = img:snapshot("one")
    assert.is_true(assert(one:delete()))
    local ok, _, code = one:apply()
    assert.is_nil(ok); assert.are.equal("notfound", code)
    ok, _, code = one:delete()
    assert.is_nil(ok); assert.are.equal("notfound", code)
    img:close()
    assert_clean(p)
    assert_same_listing(p)
    assert.is_true(h.raw_bytes(p) == at_one)

    img = open_rw(p)
    assert(img:snapshot("two"):delete())
    img:close()
    assert_clean(p)
    assert.are.equal(0, h.get_be32(p, 60))   -- nb_snapshots
    assert.are.equal(0, h.get_be64(p, 64))   -- snapshots_offset, as QEMU
    assert.is_true(h.raw_bytes(p) == at_one)
  end)

  it("reads, applies and deletes what qemu-img made, and the reverse", function()
    local p = dir .. "/x.qcow2"
    h.create(p, 32 * MiB)
    h.qemu_io(p, { "write -P 0x11 0 256k" })
    h.qemu_img("snapshot -c theirs " .. h.q(p))
    local at_theirs = h.raw_bytes(p)
    h.qemu_io(p, { "write -P 0x22 64k 64k" })
    local img = open_rw(p)
    assert(img:create_snapshot("mine"))
    local at_mine = img:read(0, img.size)
    img:close()   -- its writer lock would refuse the readers below
    assert_views_match(p)
    img = open_rw(p)
    assert(img:snapshot("theirs"):apply())
    img:close()
    assert_clean(p)
    assert.is_true(h.raw_bytes(p) == at_theirs)
    h.qemu_img("snapshot -a mine " .. h.q(p))
    assert_clean(p)
    assert.is_true(active_bytes(p) == at_mine)
    h.qemu_img("snapshot -d mine " .. h.q(p))
    assert_clean(p)
    img = open_rw(p)
    assert(img:snapshot("theirs"):delete())
    img:close()
    assert_clean(p)
    assert.are.same({}, h.info_json(p).snapshots or {})
    assert.is_true(active_bytes(p) == at_mine)
  end)

  it("keeps each snapshot's disk size across resizes", function()
    local p = dir .. "/r.qcow2"
    h.create(p, 64 * MiB)
    h.qemu_io(p, { "write -P 0x11 0 128k" })
    local img = open_rw(p)
    assert(img:create_snapshot("small"))
    img:close()
    local small = h.raw_bytes(p)
    h.qemu_img("resize -q " .. h.q(p) .. " 256M")
    h.qemu_io(p, { "write -P 0x22 200M 64k" })
    img = open_rw(p)
    assert(img:create_snapshot("big"))
    local big = img:read(0, img.size)
    assert.are.equal(64 * MiB, img:snapshot("small").disk_size)
    assert.are.equal(256 * MiB, img:snapshot("big").disk_size)
    assert(img:snapshot("small"):apply())
    assert.are.equal(64 * MiB, img.size)
    assert.is_true(img:read(0, img.size) == small)
    img:close()
    assert_clean(p)
    assert.are.equal(64 * MiB, h.info_json(p)["virtual-size"])
    assert_views_match(p)
    img = open_rw(p)
    assert(img:snapshot("big"):apply())
    assert.are.equal(256 * MiB, img.size)
    img:close()
    assert_clean(p)
    assert.is_true(active_bytes(p) == big)
  end)

  it("works over a backing file and with lazy refcounts", function()
    local base = dir .. "/base.qcow2"
    h.create(base, 32 * MiB)
    h.qemu_io(base, { "write -P 0x55 0 1M" })
    local p = dir .. "/top.qcow2"
    h.create(p, 32 * MiB, "lazy_refcounts=on", "base.qcow2")
    h.qemu_io(p, { "write -P 0x66 128k 64k" })
    local img = open_rw(p)
    assert(img:create_snapshot("s"))
    local at_s = img:read(0, img.size)
    assert(img:write(0, ("z"):rep(300000)))
    img:close()
    assert_clean(p)
    assert_views_match(p)
    img = open_rw(p)
    assert(img:snapshot("s"):apply())
    img:close()
    assert_clean(p)
    assert.is_true(h.raw_bytes(p) == at_s)
  end)
end)

describe("Image:save_vmstate and Image:load_vmstate", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  it("round-trip the VM-state area past the disk", function()
    local p = dir .. "/vm.qcow2"
    h.create(p, 16 * MiB, "cluster_size=4096")
    h.qemu_io(p, { "write -P 0x11 0 64k" })
    local disk = h.raw_bytes(p)
    local img = open_rw(p)
    local state = h.random_bytes(50000, 7)
    assert.is_true(assert(img:save_vmstate(0, state)))
    assert.is_true(assert(img:save_vmstate(10000, ("P"):rep(5000))))
    local want = state:sub(1, 10000) .. ("P"):rep(5000) .. state:sub(15001)
    assert.is_true(img:load_vmstate(0, #want) == want)
    assert.are.equal(16 * MiB, img.size)
    img:close()
    assert_clean(p)
    assert.is_true(h.raw_bytes(p) == disk)
    assert.are.equal(16 * MiB, h.info_json(p)["virtual-size"])
  end)

  it("stores opts.vm_state in the snapshot and brings it back on apply", function()
    local p = dir .. "/vms.qcow2"
    h.create(p, 16 * MiB)
    local img = open_rw(p)
    local state = h.random_bytes(200000, 3)
    assert(img:create_snapshot("s", { vm_state = state, vm_clock = 5 * 1000000000 }))
    -- QEMU drops the VM state from the active disk once it is kept:
    -- nothing is left to read there
    assert.are.equal("", img:load_vmstate(0, 1000))
    img:close()
    assert_clean(p)
    assert.are.equal(200000, oracle_snapshots(p).s["vm-state-size"])
    assert_same_listing(p)
    img = open_rw(p)
    assert(img:snapshot("s"):apply())
    assert.is_true(img:load_vmstate(0, #state) == state)
    img:close()
    assert_clean(p)
  end)
end)

describe("power cuts during snapshot operations", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  local full = os.getenv("QCOW2_SWEEP") == "full"

  -- Every operation takes effect with one header write (the active L1,
  -- the refcount table and the snapshot table switched together), so at
  -- every cut qemu-img check reports no corruption at all: exit 0 (clean)
  -- or 3 (leaks only), "corruptions" absent or 0. The image then still
  -- opens and reads, and `check -r all` leaves it clean.
  local function assert_survivable(path, label)
    local res, code, out = h.check_json(path)
    assert.is_truthy(code == 0 or code == 3,
                     label .. ": qemu-img check exit " .. tostring(code) .. "\n" .. tostring(out))
    assert.is_truthy(res, label .. ": " .. tostring(out))
    assert.are.equal(0, res.corruptions or 0, label .. ": " .. tostring(out))
    assert.are.equal(0, res["check-errors"] or 0, label .. ": " .. tostring(out))
    local img = assert(qcow2.open(path))
    assert(img:read(0, img.size))
    img:close()
    if code ~= 0 then
      local ok, rep = h.sh("qemu-img check -r all " .. h.q(path), true)
      assert.is_true(ok, label .. ": " .. rep)
      assert_clean(path)
    end
  end

  local function sweep(name, op)
    local base = dir .. "/base.qcow2"
    h.create(base, 64 * MiB)
    h.qemu_io(base, { "write -P 0x11 0 1M", "write -c -P 0x22 2M 64k",
                      "write -P 0x44 40M 64k" })
    h.qemu_img("snapshot -c old " .. h.q(base))
    h.qemu_io(base, { "write -P 0x55 64k 64k" })
    local p = dir .. "/cut.qcow2"
    h.copy(base, p)
    local img = open_rw(p, { io = { trace = true } })
    assert(op(img))
    local writes = #img:io_log()
    img:close()
    assert_clean(p)
    assert.is_true(writes > 3)
    local step = full and 1 or math.max(1, writes // 5)
    for k = 0, writes, step do
      h.copy(base, p)
      img = open_rw(p, { io = { stop_after_writes = k } })
      op(img)
      img:close()
      assert_survivable(p, name .. " cut after write " .. k)
    end
  end

  it("leaves create survivable at every write", function()
    sweep("create", function(img)
      return img:create_snapshot("new", { vm_state = ("V"):rep(1000) })
    end)
  end)

  it("leaves apply survivable at every write", function()
    sweep("apply", function(img) return img:snapshot("old"):apply() end)
  end)

  it("leaves delete survivable at every write", function()
    sweep("delete", function(img) return img:snapshot("old"):delete() end)
  end)
end)
