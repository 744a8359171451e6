-- The `qcow2` tool's forensic subcommands (owners, residue, diff,
-- inspect) and --on-error of digest/export, run as child processes on
-- qemu-img-made images. Their output is held against the library's calls
-- on the same file, and where one exists against an independent oracle
-- (qemu-img convert exports, the file's own bytes read with io).
local h = require "helpers"
local qcow2 = require "qcow2"

local TOOL = h.TOOL
local KiB, MiB = 1024, 1024 * 1024
local CLUSTER = 64 * KiB
local COPIED = 1 << 63
local OFFSET_MASK = 0x00fffffffffffe00
local FAR = 0x10000000

-- stdout, stderr, exit status of the tool; env a prefix ("X=1").
local run = h.run_tool

local sha256 = h.sha256

-- The file offset of the L2 entry mapping guest offset g (64 KiB clusters,
-- one L2 table maps 512 MiB).
local function l2_entry_at(path, g)
  local l1 = h.get_be64(path, h.get_be64(path, 40) + 8 * (g // (512 * MiB)))
  return (l1 & OFFSET_MASK) + 8 * ((g // CLUSTER) % (CLUSTER // 8))
end

-- Numbers from JSON may come back as floats: compare values, not types.
local function same_value(a, b)
  if type(a) == "number" and type(b) == "number" then
    return a == b or math.abs(a - b) <= 1e-9 * math.max(1, math.abs(a))
  end
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do if not same_value(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

-- Rows "0x... 0x..." of a human listing, as {start/offset, length} pairs.
local function hex_rows(text)
  local rows = {}
  for a, b in text:gmatch("\n(0x%x+) (0x%x+)") do
    rows[#rows + 1] = { tonumber(a:sub(3), 16), tonumber(b:sub(3), 16) }
  end
  return rows
end

describe("qcow2 tool, forensic subcommands", function()
  local dir
  local imgs = {}
  local leak_host          -- file offset of the leaked cluster
  local SECRET = "LEAKED-SECRET-" .. ("x"):rep(50)

  setup(function()
    dir = h.tmpdir()
    -- three views: s1, s2, active
    local p = dir .. "/snaps.qcow2"
    h.create(p, "8M")
    h.qemu_io(p, { "write -P 1 0 256k" })
    h.qemu_img("snapshot -c s1 " .. h.q(p))
    h.qemu_io(p, { "write -P 2 64k 64k", "write -P 9 7M 64k" })
    h.qemu_img("snapshot -c s2 " .. h.q(p))
    h.qemu_io(p, { "write -P 4 128k 4k", "write -c -P 5 3M 64k" })
    imgs.snaps = p
    -- a leaked cluster holding a secret: its L2 entry cleared, its
    -- refcount left
    p = dir .. "/leak.qcow2"
    h.create(p, "4M")
    h.qemu_io(p, { "write -P 0x11 0 64k", "write -P 0x22 64k 64k" })
    local at = l2_entry_at(p, 64 * KiB)
    leak_host = h.get_be64(p, at) & OFFSET_MASK
    h.poke(p, leak_host + 100, SECRET)
    h.poke(p, at, h.be64(0))
    imgs.leak = p
    -- a data cluster past EOF at guest 1 MiB: the rest still reads
    p = dir .. "/damaged.qcow2"
    h.create(p, "4M")
    h.qemu_io(p, { "write -P 0x33 0 128k", "write -P 0x44 1M 64k", "write -P 0x55 2M 64k" })
    h.poke(p, l2_entry_at(p, 1 * MiB), h.be64(COPIED | FAR))
    imgs.damaged = p
    -- a chain: top over base
    p = dir .. "/base.qcow2"
    h.create(p, "4M")
    h.qemu_io(p, { "write -P 0x61 0 128k", "write -P 0x62 1M 64k" })
    imgs.base = p
    p = dir .. "/top.qcow2"
    h.create(p, "4M", nil, imgs.base, "qcow2")
    h.qemu_io(p, { "write -P 0x71 64k 64k", "write -P 0x62 1M 64k", "write -P 0x72 3M 4k" })
    imgs.top = p
  end)
  teardown(h.cleanup)

  it("has --help for each new subcommand", function()
    for _, cmd in ipairs({ "owners", "residue", "diff", "inspect" }) do
      local out, _, code = run(cmd .. " --help")
      assert.are.equal(0, code)
      assert.matches("^usage: qcow2 " .. cmd, out)
    end
    local out = run("--help")
    for _, cmd in ipairs({ "owners", "residue", "diff", "inspect" }) do
      assert.matches("\n  " .. cmd .. " ", out)
    end
  end)

  describe("owners", function()
    for _, name in ipairs({ "snaps", "leak", "damaged", "top" }) do
      it("prints img:owners() as JSON and as rows for " .. name, function()
        local img <close> = assert(qcow2.open(imgs[name]))
        local want = assert(img:owners())
        local out, err, code = run("owners --json " .. h.q(imgs[name]))
        assert.are.equal(0, code, err)
        assert.is_true(same_value(want, h.json.decode(out)))
        local text = run("owners " .. h.q(imgs[name]))
        local rows = hex_rows(text)
        assert.are.equal(#want, #rows)
        local size = #h.read_file(imgs[name])
        local sum = 0
        for i, o in ipairs(want) do
          assert.are.same({ o.offset, o.length }, rows[i])
          sum = sum + rows[i][2]
        end
        assert.are.equal(size, sum)     -- the rows cover the file
      end)
    end
  end)

  describe("residue", function()
    it("carves each region to a file named by its offset, with the file's bytes", function()
      local carve = dir .. "/carved"
      local out, err, code = run("residue --json --carve " .. h.q(carve) .. " " .. h.q(imgs.leak))
      assert.are.equal(0, code, err)
      local list = h.json.decode(out)
      local img <close> = assert(qcow2.open(imgs.leak))
      local want = assert(img:residue())
      assert.are.equal(#want, #list)
      local file = h.read_file(imgs.leak)
      local found_secret = false
      for i, r in ipairs(want) do
        local name = ("%s/0x%08x-%s.bin"):format(carve, r.offset, r.kind)
        assert.are.equal(name, list[i].file)
        local bytes = h.read_file(name)
        -- the exact bytes at that offset of the image file
        assert.are.equal(file:sub(r.offset + 1, r.offset + r.length), bytes)
        if r.kind == "leaked" and bytes:find(SECRET, 1, true) then found_secret = true end
      end
      assert.is_true(found_secret)
      -- the leaked cluster is carved whole, the secret where it was planted
      local leaked = h.read_file(("%s/0x%08x-leaked.bin"):format(carve, leak_host))
      assert.are.equal(SECRET, leaked:sub(101, 100 + #SECRET))
    end)

    it("lists the regions as rows", function()
      local img <close> = assert(qcow2.open(imgs.leak))
      local want = assert(img:residue())
      local rows = hex_rows((run("residue " .. h.q(imgs.leak))))
      assert.are.equal(#want, #rows)
      for i, r in ipairs(want) do assert.are.same({ r.offset, r.length }, rows[i]) end
    end)
  end)

  describe("diff", function()
    -- the ranges a byte comparison of two raw exports gives, in clusters
    local function byte_diff(a, b)
      local out = {}
      for at = 0, math.max(#a, #b) - 1, CLUSTER do
        if a:sub(at + 1, at + CLUSTER) ~= b:sub(at + 1, at + CLUSTER) then
          h.add_range(out, at, CLUSTER)
        end
      end
      return out
    end
    -- clusters covered by a list of ranges
    local function clusters(list)
      local set = {}
      for _, d in ipairs(list) do
        for c = d.start // CLUSTER, (d.start + d.length - 1) // CLUSTER do set[c] = true end
      end
      return set
    end

    local cases = {
      { "two snapshots", function() return "--snapshot s1 --snapshot s2 " .. h.q(imgs.snaps) end,
        function(img) return assert(img:snapshot("s1"):open()), assert(img:snapshot("s2"):open()) end,
        "snaps", function() return h.raw_bytes(imgs.snaps, "s1"), h.raw_bytes(imgs.snaps, "s2") end },
      { "a snapshot and the active disk", function() return h.q(imgs.snaps) .. " --snapshot s2" end,
        function(img) return assert(img:snapshot("s2"):open()), img end,
        "snaps", function() return h.raw_bytes(imgs.snaps, "s2"), h.raw_bytes(imgs.snaps) end },
      { "a layer and its backing image", function() return h.q(imgs.top) .. " " .. h.q(imgs.base) end,
        function(img) return img, assert(qcow2.open(imgs.base)) end,
        "top", function() return h.raw_bytes(imgs.top), h.raw_bytes(imgs.base) end },
    }
    for _, c in ipairs(cases) do
      it("prints a:diff(b) between " .. c[1], function()
        local img <close> = assert(qcow2.open(imgs[c[4]]))
        local a, b = c[3](img)
        local want = assert(a:diff(b))
        local out, err, code = run("diff --json " .. c[2]())
        assert.are.equal(0, code, err)
        assert.is_true(same_value(want, h.json.decode(out)))
        local rows = hex_rows((run("diff " .. c[2]())))
        assert.are.equal(#want, #rows)
        for i, d in ipairs(want) do assert.are.same({ d.start, d.length }, rows[i]) end
        -- and what differs is what qemu-img's exports say differs
        local ra, rb = c[5]()
        assert.are.same(clusters(byte_diff(ra, rb)), clusters(want))
        assert.is_true(#want > 0)
      end)
    end

    it("refuses a missing snapshot and bad arguments", function()
      local _, err, code = run("diff " .. h.q(imgs.snaps) .. " --snapshot nope")
      assert.are.equal(1, code)
      assert.matches("nope", err)
      local _, _, code2 = run("diff " .. h.q(imgs.snaps))
      assert.are.equal(2, code2)
    end)
  end)

  describe("inspect", function()
    local function owners_by(list, key)
      local by = {}
      for _, o in ipairs(list) do
        local b = by[o[key]] or { count = 0, bytes = 0 }
        b.count, b.bytes = b.count + 1, b.bytes + o.length
        by[o[key]] = b
      end
      return by
    end

    for _, name in ipairs({ "snaps", "top", "leak" }) do
      it("--json holds every section, equal to the library's values, for " .. name, function()
        local p = imgs[name]
        local out, err, code = run("inspect --json " .. h.q(p))
        assert.are.equal(0, code, err)
        local rep = h.json.decode(out)
        local img <close> = assert(qcow2.open(p))
        -- header and features
        local hd = img:header()
        for _, k in ipairs({ "version", "l1_table_offset", "l1_size", "refcount_table_offset",
                             "nb_snapshots", "snapshots_offset", "cluster_bits" }) do
          assert.are.equal(hd[k], rep.header[k], k)
        end
        assert.is_true(same_value(hd.features, rep.header.features))
        -- chain
        local layer, depth = img, 0
        while layer do
          assert.are.equal(layer.path, rep.chain[depth + 1].path)
          assert.are.equal(layer.size, rep.chain[depth + 1].virtual_size)
          layer, depth = layer:backing(), depth + 1
        end
        assert.are.equal(depth, #rep.chain)
        -- snapshots
        local snaps = img:snapshots()
        assert.are.equal(#snaps, #rep.snapshots)
        local names = {}
        for _, s in ipairs(rep.snapshots) do names[s.name] = s.id end
        for _, s in ipairs(snaps) do assert.are.equal(s.id, names[s.name]) end
        -- map, check, owners, residue
        local m = assert(img:map())
        assert.is_true(same_value(m:stats(), rep.map.bytes))
        assert.are.equal(#m, rep.map.extents)
        local r = assert(img:check())
        for _, k in ipairs({ "ok", "corruptions", "leaks", "check_errors", "image_end_offset",
                             "allocated_clusters" }) do
          assert.are.equal(r[k], rep.check[k], k)
        end
        local owners = assert(img:owners())
        assert.are.equal(#owners, rep.owners.ranges)
        assert.is_true(same_value(owners_by(owners, "owner"), rep.owners.by_owner))
        local res = assert(img:residue())
        assert.are.equal(#res, rep.residue.count)
        if #res > 0 then
          assert.is_true(same_value(owners_by(res, "kind"), rep.residue.by_kind))
        end
        -- digests: the library's, and qemu-img's exports hashed
        assert.are.equal(img:digest("sha256"), rep.digests.active.digest)
        assert.are.equal(sha256(h.raw_bytes(p)), rep.digests.active.digest)
        assert.are.equal(#snaps, #rep.digests.snapshots)
        for _, d in ipairs(rep.digests.snapshots) do
          assert.are.equal(sha256(h.raw_bytes(p, d.name)), d.digest)
        end
        -- the text report has every section
        local text = run("inspect " .. h.q(p))
        for _, head in ipairs({ "Header and features:", "Backing chain:", "Snapshots",
                                "Guest map:", "Consistency check:", "Owners", "Residue",
                                "Digests" }) do
          assert.is_truthy(text:find(head, 1, true), head)
        end
        assert.is_truthy(text:find(rep.digests.active.digest, 1, true))
      end)
    end

    it("reports a damaged image, hashing the damage as zeroes", function()
      local out, err, code = run("inspect --json " .. h.q(imgs.damaged))
      assert.are.equal(0, code, err)
      local rep = h.json.decode(out)
      local img <close> = assert(qcow2.open(imgs.damaged))
      local hex, damage = img:digest("sha256", { on_error = "zero" })
      assert.are.equal(hex, rep.digests.active.digest)
      assert.are.equal(1, #rep.digests.active.unreadable)
      assert.are.equal(1 * MiB, rep.digests.active.unreadable[1].start)
      assert.are.equal(#damage, #rep.digests.active.unreadable)
      assert.are.equal(CLUSTER, rep.map.bytes.corrupt)
    end)
  end)

  describe("--on-error", function()
    it("digest --on-error zero equals digest{on_error = 'zero'} and lists the damage", function()
      local img <close> = assert(qcow2.open(imgs.damaged))
      local want, damage = img:digest("sha256", { on_error = "zero" })
      assert.are.equal(1, #damage)
      local out, err, code = run("digest --on-error zero " .. h.q(imgs.damaged))
      assert.are.equal(0, code, err)
      assert.are.equal(want .. "\n", out)
      assert.matches("unreadable 0x100000%+0x10000: ", err)
      -- the damaged cluster counts as zeroes, the rest as qemu-io wrote it
      local model = ("\x33"):rep(128 * KiB) .. ("\0"):rep(1 * MiB - 128 * KiB)
        .. ("\0"):rep(CLUSTER) .. ("\0"):rep(1 * MiB - CLUSTER) .. ("\x55"):rep(CLUSTER)
      model = model .. ("\0"):rep(4 * MiB - #model)
      assert.are.equal(sha256(model), want)
      -- without it (or with fail) the digest fails
      local _, err2, code2 = run("digest " .. h.q(imgs.damaged))
      assert.are.equal(1, code2)
      assert.matches("qcow2: ", err2)
      local _, _, code3 = run("digest --on-error fail " .. h.q(imgs.damaged))
      assert.are.equal(1, code3)
    end)

    it("export --on-error zero writes zeroes for the damaged range", function()
      local out_raw = dir .. "/damaged.raw"
      local _, err, code = run("export --on-error zero " .. h.q(imgs.damaged) .. " " .. h.q(out_raw))
      assert.are.equal(0, code, err)
      assert.matches("unreadable 0x100000%+0x10000: ", err)
      local data = h.read_file(out_raw)
      assert.are.equal(4 * MiB, #data)
      assert.are.equal(("\0"):rep(CLUSTER), data:sub(1 * MiB + 1, 1 * MiB + CLUSTER))
      assert.are.equal(("\x33"):rep(128 * KiB), data:sub(1, 128 * KiB))
      assert.are.equal(("\x55"):rep(CLUSTER), data:sub(2 * MiB + 1, 2 * MiB + CLUSTER))
      local img <close> = assert(qcow2.open(imgs.damaged))
      assert.are.equal((img:digest("sha256", { on_error = "zero" })), sha256(data))
      local _, _, code2 = run("export " .. h.q(imgs.damaged) .. " " .. h.q(out_raw))
      assert.are.equal(1, code2)
    end)
  end)

  describe("progress", function()
    -- stderr on a pseudo-terminal (script(1)), progress shown at once
    local function on_tty(args)
      local log = dir .. "/tty.log"
      local cmd = ("QCOW2_PROGRESS_DELAY=0 %s %s 2>&1 >/dev/null"):format(TOOL, args)
      h.must(("script -qec %s %s"):format(h.q(cmd), h.q(log)))
      return h.read_file(log)
    end

    it("digest and inspect draw a progress line on a terminal's stderr only", function()
      local p = h.q(imgs.snaps)
      assert.matches("sha256 .-%%", on_tty("digest " .. p))
      assert.matches("digests .-%%", on_tty("inspect " .. p))
      local _, err = run("digest " .. p, "QCOW2_PROGRESS_DELAY=0")
      assert.are.equal("", err)
    end)
  end)
end)

describe("img:digest progress hook", function()
  local dir, path
  setup(function()
    dir = h.tmpdir()
    path = dir .. "/p.qcow2"
    h.create(path, "24M")
    h.qemu_io(path, { "write -P 7 0 1M", "write -P 8 20M 1M" })
  end)
  teardown(h.cleanup)

  it("reports 0 first and the total last, never going back", function()
    local img <close> = assert(qcow2.open(path))
    local calls = {}
    local hex = img:digest("sha256", { progress = function(done, total)
      calls[#calls + 1] = { done, total }
    end })
    assert.are.equal(img:digest("sha256"), hex)
    assert.are.same({ 0, 24 * MiB }, calls[1])
    assert.are.same({ 24 * MiB, 24 * MiB }, calls[#calls])
    for i = 2, #calls do
      assert.is_true(calls[i][1] >= calls[i - 1][1])
      assert.are.equal(24 * MiB, calls[i][2])
    end
    -- a range: total is its length
    local last
    img:digest("md5", 1 * MiB, 4096, { progress = function(d, t) last = { d, t } end })
    assert.are.same({ 4096, 4096 }, last)
  end)

  it("propagates an error of the hook, leaving the handle usable", function()
    local img <close> = assert(qcow2.open(path))
    local err = {}
    local ok, e = pcall(img.digest, img, { on_error = "zero", progress = function(done)
      if done > 0 then error(err) end
    end })
    assert.is_false(ok)
    assert.are.equal(err, e)           -- the very error object
    assert.are.equal(("\7"):rep(16), img:read(0, 16))
    assert.are.equal(img:digest(), (img:digest({ on_error = "zero" })))
  end)

  it("raises on a hook that is not a function", function()
    local img <close> = assert(qcow2.open(path))
    assert.has_error(function() img:digest({ progress = 5 }) end,
                     "digest option 'progress' must be a function, not a number")
  end)
end)
