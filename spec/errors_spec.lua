-- One error convention in every binding function (README, "Errors"):
-- misuse raises (a wrong type, a negative offset/length/size/index, an
-- unknown option key, an unknown value of an enumeration, the wrong
-- userdata as self), and it raises before the image is asked anything, so
-- a read-only handle raises too; what depends on the image or the outside
-- world returns nil, message, code. Methods not built yet are absent.
-- Wrong types are those luaL_check* refuses: like Lua's own functions, a
-- numeric string passes as a number and a number as a string.
local h = require("helpers")
local qcow2 = h.qcow2()

local MiB = 1024 * 1024
local SIZE = 1 * MiB

-- ---- Misuse: each binding function, with calls no image could satisfy ----
-- c holds: img (read-write), ro (read-only), snap (a Snapshot of img),
-- map (a ClusterMap), result (a CheckResult), path, dir.
local misuse = {
  -- module functions
  open = {
    function(c) return qcow2.open(c.path, { moed = "rw" }) end,
    function(c) return qcow2.open(c.path, { mode = "x" }) end,
    function(c) return qcow2.open(c.path, { mode = "rw", overlap_check = "bogus" }) end,
    function(c) return qcow2.open(c.path, { mode = "rw", discard = "maybe" }) end,
    function(c) return qcow2.open(c.path, { cache = "sometimes" }) end,
    function(c) return qcow2.open(c.path, { mode = "rw", io = { fail_after_writes = 1, errno = "EFOO" } }) end,
    function(c) return qcow2.open(c.path, { mode = "rw", io = { fail_after = 1 } }) end,
    function(c) return qcow2.open(c.path, { key = 42 }) end,
    function(c) return qcow2.open(c.path, { force_share = "yes" }) end,
    function(c) return qcow2.open(c.path, { l2_cache_size = -1 }) end,
    function(c) return qcow2.open(c.path, { [1] = "rw" }) end,
    function(c) return qcow2.open(c.path, "rw") end,
    function() return qcow2.open({}) end,
    -- the options are checked before the file is looked for
    function(c) return qcow2.open(c.dir .. "/missing.qcow2", { moed = "rw" }) end,
  },
  create = {
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, sise = 1 }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = -1 }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, cluster_size = -512 }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, compression_type = "lz4" }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, preallocation = "some" }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, compat = "0.9" }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, version = 4 }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, cache = "fast" }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, encrypt = { format = "rot13" } }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, encrypt = { formt = "luks" } }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, io = { errno = "EFOO" } }) end,
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = "1M" }) end,
    -- checked before the existing file is noticed
    function(c) return qcow2.create(c.path, { size = SIZE, sise = 1 }) end,
  },
  probe = { function() return qcow2.probe({}) end },
  human_size = {
    function() return qcow2.human_size(-1) end,
    function() return qcow2.human_size("1") end,
    function() return qcow2.human_size(1.5) end,
  },

  -- Image
  read = {
    function(c) return c.img:read(-1, 1) end,
    function(c) return c.img:read(0, -1) end,
    function(c) return c.ro:read(-512, 512) end,
    function(c) return c.img:read("zero", 1) end,
    function(c) return c.img:read(0.5, 1) end,
  },
  write = {
    function(c) return c.img:write(-1, "a") end,
    function(c) return c.ro:write(-1, "a") end,    -- raises, not "readonly"
    function(c) return c.img:write(0, {}) end,
  },
  write_zeroes = {
    function(c) return c.img:write_zeroes(-1, 512) end,
    function(c) return c.img:write_zeroes(0, -512) end,
    function(c) return c.img:write_zeroes(0, 512, { unmpa = true }) end,
    function(c) return c.img:write_zeroes(0, 512, { unmap = "yes" }) end,
    function(c) return c.ro:write_zeroes(0, -512) end,
  },
  discard = {
    function(c) return c.img:discard(-1, 512) end,
    function(c) return c.img:discard(0, -512) end,
    function(c) return c.img:discard(0) end,
  },
  write_compressed = {
    function(c) return c.img:write_compressed(-65536, ("c"):rep(65536)) end,
    function(c) return c.img:write_compressed(0, {}) end,
  },
  flush = { function(c) return c.img.flush(io.stdout) end },
  resize = {
    function(c) return c.img:resize(-1) end,
    function(c) return c.ro:resize(-1) end,
    function(c) return c.img:resize("2M") end,
  },
  close = { function(c) return c.img.close(c.snap) end },
  info = { function(c) return c.img.info(c.map) end },
  info_json = { function(c) return c.img.info_json(io.stdout) end },
  header = { function(c) return c.img.header(c.snap) end },
  map = {
    function(c) return c.img:map(-1) end,
    function(c) return c.img:map(0, -1) end,
    function(c) return c.img:map(0.5) end,
  },
  digest = {
    function(c) return c.img:digest("sha256", -1, 1) end,
    function(c) return c.img:digest("sha256", 0, -1) end,
    function(c) return c.img:digest({ on_error = "skip" }) end,
    function(c) return c.img:digest("sha256", 0, 1, { on_erorr = "zero" }) end,
    function(c) return c.img:digest({ on_error = true }) end,
  },
  snapshots = { function(c) return c.img.snapshots(c.map) end },
  snapshot = { function(c) return c.img:snapshot({}) end },
  backing = { function(c) return c.img.backing(io.stdout) end },
  l1 = { function(c) return c.img.l1(c.snap) end },
  diff = {
    function(c) return c.img:diff() end,
    function(c) return c.img:diff(c.snap) end,
    function(c) return c.img.diff(c.map, c.img) end,
  },
  bitmaps = { function(c) return c.img.bitmaps(c.snap) end },
  convert = {
    function(c) return c.img:convert() end,
    function(c) return c.img:convert(c.dir .. "/n.qcow2", { colour = 1 }) end,
    function(c) return c.img:convert(c.dir .. "/n.qcow2", { format = "vmdk" }) end,
    function(c) return c.img:convert(c.dir .. "/n.qcow2", { format = "raw", cluster_size = 4096 }) end,
    function(c) return c.img.convert(c.snap, c.dir .. "/n.qcow2") end,
  },
  l2 = {
    function(c) return c.img:l2(-1) end,
    function(c) return c.img:l2(true) end,
  },
  refcount = {
    function(c) return c.img:refcount(-1) end,
    function(c) return c.ro:refcount(-1) end,
  },
  raw_read = {
    function(c) return c.img:raw_read(-1, 4) end,
    function(c) return c.ro:raw_read(0, -4) end,
  },
  raw_write = {
    function(c) return c.img:raw_write(-1, "x") end,
    function(c) return c.ro:raw_write(-1, "x") end,
  },
  io_log = { function(c) return c.img.io_log(c.map) end },
  stats = { function(c) return c.img.stats(c.map) end },
  owners = {
    function(c) return c.img.owners(c.map) end,
    function(c) return c.ro.owners(c.snap) end,
  },
  residue = {
    function(c) return c.img.residue(c.map) end,
    function(c) return c.ro.residue(c.result) end,
  },
  check = {
    function(c) return c.img:check({ repair = "bogus" }) end,
    function(c) return c.img:check({ repiar = "leaks" }) end,
    function(c) return c.img:check({ repair = true }) end,
    function(c) return c.ro:check({ repair = "bogus" }) end,
    function(c) return c.img:check("leaks") end,
  },
  amend = {
    function(c) return c.img:amend({ lazy_refcount = true }) end,
    function(c) return c.img:amend({ version = 4 }) end,
    function(c) return c.img:amend({ compat = "2.0" }) end,
    function(c) return c.img:amend({ size = -1 }) end,
    function(c) return c.img:amend({ lazy_refcounts = "on" }) end,
    function(c) return c.img:amend({ compression_type = "lz4" }) end,
    function(c) return c.img:amend({ preallocation = "some" }) end,
    function(c) return c.img:amend({ cluster_size = -1 }) end,
    function(c) return c.ro:amend({ lazy_refcount = true }) end,
    function(c) return c.img:amend() end,
  },
  make_empty = { function(c) return c.img.make_empty(c.snap) end },
  rebase = {
    function(c) return c.img:rebase("x.qcow2", { fromat = "qcow2" }) end,
    function(c) return c.img:rebase("x.qcow2", { format = "vmdk" }) end,
    function(c) return c.img:rebase("x.qcow2", { unsafe = "yes" }) end,
    function(c) return c.img:rebase({}) end,
    function(c) return c.img.rebase(c.snap, "x.qcow2") end,
    function(c) return c.ro:rebase("x.qcow2", { format = 1 }) end,
  },
  commit = { function(c) return c.img.commit(c.snap) end },
  create_snapshot = {
    function(c) return c.img:create_snapshot("t", { vm_clock = -1 }) end,
    function(c) return c.ro:create_snapshot("t", { vm_clock = -1 }) end,
    function(c) return c.img:create_snapshot("t", { vm_clok = 1 }) end,
    function(c) return c.img:create_snapshot("t", { date = -1 }) end,
    function(c) return c.img:create_snapshot("t", { date = 1 << 32 }) end,
    function(c) return c.img:create_snapshot("t", { date_nsec = 1000000000 }) end,
    function(c) return c.img:create_snapshot("t", { icount = -2 }) end,
    function(c) return c.img:create_snapshot("t", { vm_state = 1 }) end,
    function(c) return c.img:create_snapshot({}) end,
  },
  save_vmstate = {
    function(c) return c.img:save_vmstate(-1, "x") end,
    function(c) return c.ro:save_vmstate(-1, "x") end,
    function(c) return c.img:save_vmstate(0, true) end,
  },
  load_vmstate = {
    function(c) return c.img:load_vmstate(-1, 1) end,
    function(c) return c.img:load_vmstate(0, -1) end,
  },

  -- Snapshot
  ["Snapshot:open"] = { function(c) return c.snap.open(c.img) end },
  ["Snapshot:map"] = {
    function(c) return c.snap:map(-1) end,
    function(c) return c.snap:map(0, -1) end,
  },
  ["Snapshot:apply"] = { function(c) return c.snap.apply(c.img) end },
  ["Snapshot:delete"] = { function(c) return c.snap.delete(c.img) end },

  -- ClusterMap and CheckResult
  ["ClusterMap:extents"] = { function(c) return c.map.extents(c.img) end },
  ["ClusterMap:stats"] = { function(c) return c.map.stats(c.img) end },
  ["ClusterMap:records"] = { function(c) return c.map.records(c.img) end },
  ["ClusterMap:to_json"] = { function(c) return c.map.to_json(c.img) end },
  ["CheckResult:findings"] = { function(c) return c.result.findings(c.img) end },
  ["CheckResult:records"] = { function() return qcow2.methods.CheckResult.records(nil) end },
  ["CheckResult:to_json"] = { function() return qcow2.methods.CheckResult.to_json(nil) end },
}

-- ---- Image-dependent failures: nil, message, code ---------------------------
local returns = {
  { "open of a missing file", "notfound", function(c) return qcow2.open(c.dir .. "/missing.qcow2", { mode = "rw" }) end },
  { "create over an existing file", "exists", function(c) return qcow2.create(c.path, { size = SIZE }) end },
  { "create with a cluster size qemu-img refuses", "invalid",
    function(c) return qcow2.create(c.dir .. "/n.qcow2", { size = SIZE, cluster_size = 1000 }) end },
  { "read past the end", "invalid", function(c) return c.img:read(SIZE + 1, 1) end },
  { "write past the end", "invalid", function(c) return c.img:write(SIZE, "x") end },
  { "write_zeroes past the end", "invalid", function(c) return c.img:write_zeroes(SIZE - 512, 1024) end },
  { "discard past the end", "invalid", function(c) return c.img:discard(2 * SIZE, 512) end },
  { "write_compressed past the end", "invalid",
    function(c) return c.img:write_compressed(SIZE, ("c"):rep(65536)) end },
  { "map past the end", "invalid", function(c) return c.img:map(SIZE + 1) end },
  { "digest past the end", "invalid", function(c) return c.img:digest("sha256", SIZE + 1, 1) end },
  { "digest with an algorithm OpenSSL lacks", "invalid", function(c) return c.img:digest("nohash") end },
  { "l2 past the L1 table", "invalid", function(c) return c.img:l2(#c.img:l1()) end },
  { "raw_read past the end of the file", "invalid",
    function(c) return c.img:raw_read(1 << 40, 1) end },
  { "Snapshot:map past the end", "invalid", function(c) return c.snap:map(SIZE + 1) end },
  { "amend with a version disagreeing with compat", "invalid",
    function(c) return c.img:amend({ version = 2, compat = "1.1" }) end },
  { "amend of a creation-only option", "unsupported", function(c) return c.img:amend({ cluster_size = 4096 }) end },
  { "write on a read-only handle", "readonly", function(c) return c.ro:write(0, "x") end },
  { "write_zeroes on a read-only handle", "readonly", function(c) return c.ro:write_zeroes(0, 512) end },
  { "discard on a read-only handle", "readonly", function(c) return c.ro:discard(0, 512) end },
  { "resize on a read-only handle", "readonly", function(c) return c.ro:resize(2 * SIZE) end },
  { "raw_write on a read-only handle", "readonly", function(c) return c.ro:raw_write(0, "x") end },
  { "amend on a read-only handle", "readonly", function(c) return c.ro:amend({ lazy_refcounts = true }) end },
  { "make_empty on a read-only handle", "readonly", function(c) return c.ro:make_empty() end },
  { "rebase on a read-only handle", "readonly", function(c) return c.ro:rebase("", { unsafe = true }) end },
  { "commit on a read-only handle", "readonly", function(c) return c.ro:commit() end },
  { "create_snapshot on a read-only handle", "readonly",
    function(c) return c.ro:create_snapshot("t", { vm_clock = 1 }) end },
  { "save_vmstate on a read-only handle", "readonly", function(c) return c.ro:save_vmstate(0, "x") end },
  { "check repair on a read-only handle", "readonly", function(c) return c.ro:check({ repair = "leaks" }) end },
  { "Snapshot:apply on a read-only handle", "readonly", function(c) return c.ro:snapshots()[1]:apply() end },
  { "Snapshot:delete on a read-only handle", "readonly", function(c) return c.ro:snapshots()[1]:delete() end },
}

-- Every method of each type, as the library registers them.
local IMAGE_METHODS = {
  "read", "write", "write_zeroes", "discard", "write_compressed", "flush",
  "resize", "close", "info", "info_json", "header", "map", "digest",
  "snapshots", "snapshot", "backing", "l1", "l2", "refcount", "raw_read",
  "raw_write", "io_log", "stats", "check", "amend", "make_empty", "create_snapshot",
  "save_vmstate", "load_vmstate", "diff", "bitmaps", "owners", "residue",
  "rebase", "commit", "convert",
}
-- In the contract, not built yet: absent, never a stub.
local NOT_BUILT = {}

describe("the error convention", function()
  local c

  before_each(function()
    local dir = h.tmpdir()
    local path = dir .. "/disk.qcow2"
    h.create(path, "1M")
    h.qemu_io(path, { "write -P 0x5a 0 64k" })
    h.qemu_img("snapshot -c s1 " .. h.q(path))
    c = { dir = dir, path = path }
    c.img = assert(qcow2.open(path, { mode = "rw" }))
    -- a copy: the read-only handle never shares the read-write one's file
    h.copy(path, dir .. "/ro.qcow2")
    c.ro = assert(qcow2.open(dir .. "/ro.qcow2"))
    c.snap = c.img:snapshots()[1]
    c.map = c.img:map()
    c.result = c.img:check()
  end)

  after_each(function()
    c.img:close()
    c.ro:close()
    h.cleanup()
  end)

  local names = {}
  for name in pairs(misuse) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    it(name .. " raises on misuse, and changes nothing", function()
      local before = h.sha256_file(c.path)
      for i, call in ipairs(misuse[name]) do
        local ok, err = pcall(call, c)
        assert.is_false(ok, name .. " misuse #" .. i .. " did not raise")
        assert.is_string(err)
      end
      c.img:flush()
      assert.are.equal(before, h.sha256_file(c.path), name .. " wrote on a misuse")
      assert.is_nil(io.open(c.dir .. "/n.qcow2"), "a misused create made a file")
    end)
  end

  it("covers every method of every type", function()
    local covered = {}
    for name in pairs(misuse) do covered[name] = true end
    local kinds = { Image = "", Snapshot = "Snapshot:", ClusterMap = "ClusterMap:",
                    CheckResult = "CheckResult:" }
    for kind, prefix in pairs(kinds) do
      for method in pairs(qcow2.methods[kind]) do
        assert.is_true(covered[prefix .. method] == true,
                       kind .. ":" .. method .. " has no misuse case")
      end
    end
  end)

  it("names the function and the fault in the raised message", function()
    local cases = {
      { function() return qcow2.open(c.path, { moed = "rw" }) end, "bad option 'moed' to 'open' (unknown option)" },
      { function() return qcow2.open(c.path, { mode = "x" }) end, "bad option 'mode' to 'open' (invalid value 'x')" },
      { function() return c.img:write(-1, "a") end, "bad argument #1 to 'write' (negative offset -1)" },
      { function() return c.img:save_vmstate(-1, "a") end, "bad argument #1 to 'save_vmstate' (negative offset -1)" },
      { function() return c.img:read(0, -1) end, "bad argument #2 to 'read' (negative length -1)" },
      { function() return c.img:amend({ bogus = 1 }) end, "bad option 'bogus' to 'amend' (unknown option)" },
      { function() return c.img:create_snapshot("t", { vm_clock = -1 }) end,
        "bad option 'vm_clock' to 'create_snapshot' (non-negative integer expected)" },
    }
    for _, case in ipairs(cases) do
      assert.has_error(case[1], case[2])
    end
  end)

  for _, r in ipairs(returns) do
    it(r[1] .. " returns nil, message, " .. r[2], function()
      local value, msg, code = r[3](c)
      assert.is_nil(value)
      assert.is_string(msg)
      assert.is_truthy(msg:find("/", 1, true), "the message names no file: " .. msg)
      assert.are.equal(r[2], code, msg)
    end)
  end

  it("accepts every documented open key", function()
    -- the read-only copy: c.path is held read-write by c.img (locks)
    local img = assert(qcow2.open(c.dir .. "/ro.qcow2", {
      mode = "r", backing = true, key = "secret", repair = false,
      cache_size = 1 * MiB, lazy_refcounts = false, overlap_check = "all",
      discard = "ignore", cache = "writethrough", force_share = false,
      io = { trace = true },
    }))
    assert.are.equal(string.rep("\x5a", 16), img:read(0, 16))
    img:close()
  end)

  it("ignores key on an image that is not encrypted, as qemu-io does", function()
    local img = assert(qcow2.open(c.dir .. "/ro.qcow2", { key = "secret" }))
    assert.are.equal(string.rep("\x5a", 16), img:read(0, 16))
    img:close()
    -- the oracle: QEMU 7.2 takes encrypt.key-secret on a plain image and reads it
    local ok, out = h.sh("qemu-io -r --object secret,id=s0,data=x --image-opts " ..
                         h.q("driver=qcow2,file.filename=" .. c.dir .. "/ro.qcow2,encrypt.key-secret=s0") ..
                         " -c 'read -P 0x5a 0 64k'", true)
    assert.is_true(ok, out)
    assert.is_truthy(out:find("read 65536/65536 bytes", 1, true), out)
    assert.is_nil(out:find("failed", 1, true), out)
  end)

  it("has the methods that are built, and no stubs for those that are not", function()
    for _, name in ipairs(IMAGE_METHODS) do
      assert.are.equal("function", type(c.img[name]), "Image:" .. name)
    end
    for _, name in ipairs(NOT_BUILT) do
      assert.is_nil(c.img[name], "Image:" .. name .. " is a stub")
    end
    for _, name in ipairs({ "open", "map", "apply", "delete" }) do
      assert.are.equal("function", type(c.snap[name]), "Snapshot:" .. name)
    end
    for _, name in ipairs({ "compare", "measure" }) do
      assert.are.equal("function", type(qcow2[name]), "qcow2." .. name)
    end
  end)
end)
