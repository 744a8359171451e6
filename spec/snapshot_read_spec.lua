-- Reading internal snapshots: the snapshot list, Snapshot fields and
-- tostring, and read-only views of the disk at each snapshot, against
-- qemu-img info / snapshot -l / convert -l.
local h = require("helpers")
local corpus = require("corpus")
local qcow2 = require("qcow2")

local function int(v) return math.tointeger(v) or v end

describe("Image:snapshots", function()
  local dir, path, names, info
  setup(function()
    dir = h.tmpdir()
    path, names = corpus.snapshots(dir)
    info = h.info_json(path)
  end)
  teardown(function() h.cleanup() end)

  it("lists the snapshots in table order with qemu-img's ids and names", function()
    local img = assert(qcow2.open(path))
    local list = img:snapshots()
    assert.are.equal(#info.snapshots, #list)
    assert.are.equal(#names, #list)
    for i, s in ipairs(list) do
      assert.are.equal(info.snapshots[i].id, s.id)
      assert.are.equal(info.snapshots[i].name, s.name)
      assert.are.equal(names[i], s.name)
    end
    img:close()
  end)

  it("gives each snapshot the date, vm clock, vm state size and icount qemu-img reports", function()
    local img = assert(qcow2.open(path))
    for i, s in ipairs(img:snapshots()) do
      local q = info.snapshots[i]
      assert.are.equal(int(q["date-sec"]), s.date)
      assert.are.equal(int(q["date-nsec"]), s.date_nsec)
      assert.are.equal(int(q["vm-clock-sec"]) * 1000000000 + int(q["vm-clock-nsec"]), s.vm_clock)
      assert.are.equal(int(q["vm-state-size"]), s.vm_state_size)
      assert.are.equal(int(q.icount), s.icount)
    end
    img:close()
  end)

  it("gives each snapshot the disk size qemu-img snapshot -a restores", function()
    local img = assert(qcow2.open(path))
    local sizes = {}
    for i, s in ipairs(img:snapshots()) do
      sizes[i] = math.tointeger(h.info_json(corpus.snapshot_applied(path, s.name))["virtual-size"])
      assert.are.equal(sizes[i], s.disk_size, s.name)
    end
    assert.are_not.equal(sizes[1], sizes[3]) -- the image was resized between them
    img:close()
  end)

  it("gives each snapshot the L1 table offset and size stored in its table entry", function()
    local img = assert(qcow2.open(path))
    local off = h.get_be64(path, 64)
    for _, s in ipairs(img:snapshots()) do
      assert.are.equal(h.get_be64(path, off), s.l1_table_offset)
      assert.are.equal(h.get_be32(path, off + 8), s.l1_size)
      local extra = h.get_be32(path, off + 36)
      local id_len = string.unpack(">I2", h.peek(path, off + 12, 2))
      local name_len = string.unpack(">I2", h.peek(path, off + 14, 2))
      assert.are.equal(s.id, h.peek(path, off + 40 + extra, id_len))
      assert.are.equal(s.name, h.peek(path, off + 40 + extra + id_len, name_len))
      local len = 40 + extra + id_len + name_len
      off = off + (len + 7) // 8 * 8
    end
    img:close()
  end)

  it("finds a snapshot by id and by name, and nothing for an unknown one", function()
    local img = assert(qcow2.open(path))
    for _, q in ipairs(info.snapshots) do
      local by_id, by_name = img:snapshot(q.id), img:snapshot(q.name)
      assert.are.equal(q.name, by_id.name)
      assert.are.equal(q.id, by_name.id)
    end
    assert.is_nil(img:snapshot("no such snapshot"))
    assert.is_nil(img:snapshot("99"))
    img:close()
  end)

  it("prints each snapshot as the row of qemu-img snapshot -l", function()
    local rows = corpus.snapshot_rows(path)
    local img = assert(qcow2.open(path))
    local list = img:snapshots()
    assert.are.equal(#rows, #list)
    for i, s in ipairs(list) do
      assert.are.equal(rows[i], tostring(s))
    end
    img:close()
  end)
end)

describe("Snapshot:open", function()
  local dir, path, names
  setup(function()
    dir = h.tmpdir()
    path, names = corpus.snapshots(dir)
  end)
  teardown(function() h.cleanup() end)

  -- qemu-img convert -l loads only the snapshot's L1 table and keeps the
  -- current disk size, so its export of a snapshot taken before a resize
  -- is the snapshot's disk followed by zeroes up to the current size. A
  -- view has the snapshot's own size (as snapshot -a restores it).
  it("reads each snapshot like qemu-img convert -l snapshot.name=NAME, up to the snapshot's size", function()
    local img = assert(qcow2.open(path))
    for _, name in ipairs(names) do
      local exported = h.raw_bytes(path, name)
      local view = assert(img:snapshot(name):open())
      assert.are.equal(img:snapshot(name).disk_size, view.size)
      assert.is_true(view.size <= #exported)
      local want = exported:sub(1, view.size)
      assert.are.equal(("\0"):rep(#exported - view.size), exported:sub(view.size + 1))
      corpus.assert_bytes(view:read(0, view.size), want, name)
      for _, r in ipairs(corpus.odd_ranges(65536, view.size)) do
        corpus.assert_bytes(view:read(r[1], r[2]), want:sub(r[1] + 1, r[1] + r[2]), name, r[1])
      end
      view:close()
    end
    img:close()
  end)

  it("reads each snapshot like qemu-img's export of a copy with the snapshot applied", function()
    local img = assert(qcow2.open(path))
    for _, name in ipairs(names) do
      local want = h.raw_bytes(corpus.snapshot_applied(path, name))
      local view = assert(img:snapshot(name):open())
      assert.are.equal(#want, view.size)
      corpus.assert_bytes(view:read(0, view.size), want, name)
      view:close()
    end
    img:close()
  end)

  it("gives views that differ from each other and from the active disk as qemu-img's exports do", function()
    local img = assert(qcow2.open(path))
    local active = h.raw_bytes(path)
    corpus.assert_bytes(img:read(0, img.size), active, "active")
    local first = assert(img:snapshot(names[1]):open())
    local second = assert(img:snapshot(names[2]):open())
    assert.are_not.equal(first:read(0, first.size), second:read(0, second.size))
    assert.are.equal(h.raw_bytes(path, names[1]) == h.raw_bytes(path, names[2]),
      first:read(0, first.size) == second:read(0, second.size))
    first:close()
    second:close()
    img:close()
  end)

  it("digests each view like sha256 of qemu-img's export", function()
    local img = assert(qcow2.open(path))
    for _, name in ipairs(names) do
      local view = assert(img:snapshot(name):open())
      assert.are.equal(corpus.sha256(h.raw_bytes(corpus.snapshot_applied(path, name))), view:digest())
      view:close()
    end
    img:close()
  end)

  it("maps each snapshot as qemu-img maps a copy with the snapshot applied", function()
    local img = assert(qcow2.open(path))
    for _, name in ipairs(names) do
      -- The applied copy is another file with other host blocks, so QEMU's
      -- hole split (its preallocation guess) is folded away on both sides.
      local want = corpus.without_hole_split(corpus.qemu_map(corpus.snapshot_applied(path, name)))
      local s = img:snapshot(name)
      assert.are.same(want, corpus.without_hole_split(corpus.decode_map(s:map():to_json())), name .. " (Snapshot:map)")
      local view = assert(s:open())
      assert.are.same(want, corpus.without_hole_split(corpus.decode_map(view:map():to_json())), name .. " (view:map)")
      view:close()
    end
    img:close()
  end)

  it("gives read-only views that refuse writes with code readonly", function()
    local img = assert(qcow2.open(path))
    local view = assert(img:snapshot(names[1]):open())
    assert.is_true(view.read_only)
    local ok, msg, code = view:write(0, "x")
    assert.is_nil(ok)
    assert.are.equal("string", type(msg))
    assert.are.equal("readonly", code)
    view:close()
    img:close()
  end)

  it("keeps views readable after the Image handle is dropped and collected", function()
    local want = h.raw_bytes(corpus.snapshot_applied(path, names[2]))
    local view
    do
      local img = assert(qcow2.open(path))
      view = assert(img:snapshot(names[2]):open())
    end
    collectgarbage()
    collectgarbage()
    corpus.assert_bytes(view:read(0, view.size), want, names[2])
    view:close()
    collectgarbage()
  end)

  it("keeps a Snapshot usable after the Image handle is dropped and collected", function()
    local want = h.raw_bytes(corpus.snapshot_applied(path, names[3]))
    local s
    do
      local img = assert(qcow2.open(path))
      s = img:snapshot(names[3])
    end
    collectgarbage()
    collectgarbage()
    local view = assert(s:open())
    corpus.assert_bytes(view:read(0, view.size), want, names[3])
    view:close()
  end)
end)
