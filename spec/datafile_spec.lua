-- External data files (incompatible bit 2): images qemu-img made read as
-- qemu-img reads them; images the library made (and wrote) open in
-- qemu-img, read back there, and check clean; with data_file_raw the data
-- file holds the guest bytes at guest offsets; opts.data_file names the
-- file; the name in the image follows the backing-file policy.
local h = require("helpers")
local qcow2 = require("qcow2")

local KiB, MiB = 1024, 1024 * 1024

-- QEMU 7.2 resolves a relative data-file name against its working
-- folder (the library: against the image's, as backing names): qemu
-- tools run in the image's folder here.
local function in_dir(path, cmd)
  local d, name = path:match("^(.*)/([^/]+)$")
  return h.must("cd " .. h.q(d) .. " && " .. cmd:gsub("@", h.q(name)))
end
local function qemu_io(path, cmds)
  local parts = {}
  for _, c in ipairs(cmds) do parts[#parts + 1] = "-c " .. h.q(c) end
  return in_dir(path, "qemu-io -f qcow2 " .. table.concat(parts, " ") .. " @")
end
local function check_json(path)
  local d, name = path:match("^(.*)/([^/]+)$")
  local _, out = h.sh("cd " .. h.q(d) .. " && qemu-img check --output=json " .. h.q(name))
  return h.json.decode(out)
end

local function export(path)
  local raw = path .. ".export.raw"
  in_dir(path, "qemu-img convert -O raw @ " .. h.q(raw))
  local bytes = h.read_file(raw)
  os.remove(raw)
  return bytes
end

describe("external data files", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  for _, raw in ipairs({ false, true }) do
    local o = "data_file=d.bin" .. (raw and ",data_file_raw=on" or "")
    it("made by qemu-img (" .. o .. ") read as qemu-img convert reads them", function()
      local p = dir .. "/img.qcow2"
      h.must("cd " .. h.q(dir) .. " && qemu-img create -q -f qcow2 -o " .. o .. " img.qcow2 2M")
      qemu_io(p, { "write -P 0x51 4k 60k", "write -z 128k 64k", "write -P 0x52 1M 3k" })
      local img <close> = assert(qcow2.open(p))
      assert.equal(export(p), img:read(0, img.size))
      local r = img:check()
      assert.equal(0, r.corruptions)
    end)

    it("made by the library (" .. o .. ") open in qemu-img and check clean", function()
      local p = dir .. "/lib.qcow2"
      local img = assert(qcow2.create(p, { size = 2 * MiB, data_file = "d.bin", data_file_raw = raw or nil }))
      local data = h.random_bytes(100 * KiB, 3)
      assert(img:write(10 * KiB, data))
      assert(img:write_zeroes(512 * KiB, 64 * KiB))
      assert(img:write(1536 * KiB, ("Q"):rep(4 * KiB)))
      img:close()
      local r = check_json(p)
      assert.equal(0, r.corruptions or 0)
      assert.equal(0, r.leaks or 0)
      local info = h.json.decode(in_dir(p, "qemu-img info --output=json @"))
      assert.equal("d.bin", info["format-specific"].data["data-file"])
      local guest = export(p)
      assert.equal(data, guest:sub(10 * KiB + 1, 10 * KiB + #data))
      assert.equal(("Q"):rep(4 * KiB), guest:sub(1536 * KiB + 1, 1540 * KiB))
      qemu_io(p, { "read -P 0x51 0 0" })    -- opens with its data file
      if raw then
        -- the data file is a raw image of the guest disk
        local df = h.read_file(dir .. "/d.bin")
        assert.equal(data, df:sub(10 * KiB + 1, 10 * KiB + #data))
        assert.equal(("Q"):rep(4 * KiB), df:sub(1536 * KiB + 1, 1540 * KiB))
      end
      -- and back through the library
      local ro <close> = assert(qcow2.open(p))
      assert.equal(guest, ro:read(0, ro.size))
      assert.equal(0, ro:check().corruptions)
    end)
  end

  it("creates the header qemu-img creates", function()
    local ours, theirs = dir .. "/ours.qcow2", dir .. "/theirs.qcow2"
    assert(qcow2.create(ours, { size = MiB, data_file = "ours.data", data_file_raw = true })):close()
    h.must("cd " .. h.q(dir) .. " && qemu-img create -q -f qcow2 -o data_file=ours.data,data_file_raw=on theirs.qcow2 1M")
    assert.equal(h.read_file(theirs), h.read_file(ours))
  end)

  it("opts.data_file names the file; the stored name follows the backing policy", function()
    local p = dir .. "/img.qcow2"
    h.must("cd " .. h.q(dir) .. " && qemu-img create -q -f qcow2 -o data_file=d.bin img.qcow2 1M")
    qemu_io(p, { "write -P 0x61 0 64k" })
    h.must("mkdir " .. h.q(dir .. "/elsewhere") .. " && mv " .. h.q(dir .. "/d.bin") .. " " .. h.q(dir .. "/elsewhere/x.bin"))
    local _, _, code = qcow2.open(p)
    assert.equal("notfound", code)
    local img <close> = assert(qcow2.open(p, { data_file = dir .. "/elsewhere/x.bin" }))
    assert.equal(("\x61"):rep(64 * KiB), img:read(0, 64 * KiB))
    -- an image without a data file refuses the option
    h.create(dir .. "/plain.qcow2", MiB)
    _, _, code = qcow2.open(dir .. "/plain.qcow2", { data_file = dir .. "/elsewhere/x.bin" })
    assert.equal("invalid", code)
    assert.has_error(function() qcow2.open(p, { data_file = 5 }) end)
    -- protocol names stored in the image are not followed
    local q2 = dir .. "/proto.qcow2"
    h.must("cd " .. h.q(dir) .. " && qemu-img create -q -f qcow2 -o data_file=nbd.bin proto.qcow2 1M")
    -- the same length, so the extension keeps its size
    local bytes = h.read_file(q2)
    local at = assert(bytes:find("nbd.bin", 1, true))
    h.poke(q2, at - 1, "nbd:x:1")
    _, _, code = qcow2.open(q2)
    assert.equal("unsupported", code)
  end)
end)
