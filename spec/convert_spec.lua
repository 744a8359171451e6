-- img:convert against qemu-img (the oracle): every corpus image converted
-- to qcow2 and to raw reads the same as its source (qemu-img compare) and
-- the qcow2 output checks clean; compressed output, sparseness against
-- qemu-img's own convert, interrupted converts, -B overlays, progress.
-- `make test` samples the corpus; QCOW2_SWEEP=full converts all of it.
local h = require "helpers"
local corpus = require "corpus"
local qcow2 = require "qcow2"

local FULL = os.getenv("QCOW2_SWEEP") == "full"
local KiB, MiB = corpus.KiB, corpus.MiB

local function exists(p) local f = io.open(p, "rb") if f then f:close() end return f ~= nil end
local function size_of(p) return tonumber((h.must("stat -c %s " .. h.q(p)))) end
local function blocks(p) return tonumber((h.must("stat -c %b " .. h.q(p)))) end
-- qemu-img compare's exit status (stderr dropped).
local function qemu_compare(a, b, extra)
  local ok, _, code = h.sh("qemu-img compare " .. (extra or "") .. " " .. h.q(a) .. " " .. h.q(b))
  return ok and 0 or code
end

describe("img:convert", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  -- The sample `make test` converts: one of each family (v2, small
  -- clusters, refcount width, zlib and zstd compression, extended L2,
  -- dirty lazy refcounts); QCOW2_SWEEP=full takes every kind.
  local SAMPLE = {
    ["a v2 (compat=0.10) image"] = true,
    ["a v3 image with 512-byte clusters"] = true,
    ["an image with 1-bit refcounts"] = true,
    ["an image with zstd-compressed clusters"] = true,
    ["a zlib image made by qemu-img convert -c of real data"] = true,
    ["an extended-L2 image with subcluster writes"] = true,
    ["a lazy-refcount image left dirty by a killed writer"] = true,
  }
  for _, kind in ipairs(corpus.small_kinds) do
    if FULL or SAMPLE[kind.name] then
      it("converts " .. kind.name .. " to qcow2 and to raw, byte for byte", function()
        local d = h.tmpdir()
        local src = kind.build(d)
        local img = assert(qcow2.open(src))
        local q, r = d .. "/out.qcow2", d .. "/out.raw"
        assert.is_true(img:convert(q))
        assert.is_true(img:convert(r, { format = "raw" }))
        img:close()
        assert.equal(0, qemu_compare(src, q))
        assert.equal(0, qemu_compare(src, r, "-F raw"))
        local check = h.check_json(q)
        assert.equal(0, check.corruptions or 0)
        assert.equal(0, check.leaks or 0)
      end)
    end
  end

  it("converts a three-level chain (raw base) into one standalone image", function()
    local c = corpus.chain(dir)
    local img = assert(qcow2.open(c.top))
    local out = dir .. "/chain-flat.qcow2"
    assert.is_true(img:convert(out, { cluster_size = 4096 }))
    img:close()
    assert.equal(0, qemu_compare(c.top, out))
    assert.is_nil(h.info_json(out)["backing-filename"])
    assert.equal(0, h.check_json(out).corruptions or 0)
  end)

  it("converts every internal snapshot (by name and by id) as qemu-img convert -l does", function()
    local p, names = corpus.snapshots(dir)
    local img = assert(qcow2.open(p))
    for i, name in ipairs(names) do
      local out = ("%s/snap%d.raw"):format(dir, i)
      assert.is_true(img:convert(out, { format = "raw", snapshot = name }))
      -- qemu-img convert -l pads to the current virtual size; the
      -- library's output is the snapshot's own disk size.
      h.write_file(out .. ".ref", h.raw_bytes(p, name))
      assert.equal(img:snapshots()[i].disk_size, size_of(out))
      assert.equal(0, qemu_compare(out, out .. ".ref", "-f raw -F raw"))
      local outq = ("%s/snap%d.qcow2"):format(dir, i)
      assert.is_true(img:convert(outq, { snapshot = img:snapshots()[i].id }))
      assert.equal(0, qemu_compare(out, outq, "-f raw -F qcow2"))
    end
    local ok, msg, code = img:convert(dir .. "/none.qcow2", { snapshot = "no such" })
    assert.is_nil(ok)
    assert.equal("notfound", code)
    assert.matches("no snapshot", msg)
    assert.is_false(exists(dir .. "/none.qcow2"))
    img:close()
  end)

  describe("compressed output", function()
    for _, ctype in ipairs({ "zlib", "zstd" }) do
      it(("is smaller than its input and checks clean (%s)"):format(ctype), function()
        local raw = corpus.real_data_file(dir .. "/real-" .. ctype .. ".raw")
        local src = dir .. "/real-" .. ctype .. ".qcow2"
        h.qemu_img("convert -O qcow2 " .. h.q(raw) .. " " .. h.q(src))
        local img = assert(qcow2.open(src))
        local out = dir .. "/real-" .. ctype .. ".c.qcow2"
        assert.is_true(img:convert(out, { compress = true, compression_type = ctype, threads = 2 }))
        img:close()
        assert.equal(0, qemu_compare(src, out))
        assert.is_true(size_of(out) < size_of(src))
        local check = h.check_json(out)
        assert.equal(0, check.corruptions or 0)
        assert.equal(0, check.leaks or 0)
        assert.is_true((check["compressed-clusters"] or 0) > 0)
        assert.equal(ctype, h.info_json(out)["format-specific"].data["compression-type"])
      end)
    end
  end)

  -- Chunks are read one step ahead of their writes (compression pool,
  -- writer thread): a source of several chunks with every kind of
  -- cluster on them, a whole chunk of zeroes, a partial last cluster.
  describe("over many chunks, written a step behind their reads", function()
    local src
    setup(function()
      local raw = dir .. "/many.raw"
      local parts = {
        string.rep("\x11", 1 * MiB + 4 * KiB),      -- across a cluster
        h.random_bytes(192 * KiB, 7),               -- does not shrink
        string.rep("\0", 3 * MiB),                  -- a zero chunk
        string.rep("abcdefgh", 256 * KiB),          -- 2 MiB, compressible
        string.rep("\0", 64 * KiB),
        h.random_bytes(64 * KiB, 8) .. string.rep("\x5a", 2 * MiB),
      }
      local data = table.concat(parts)
      -- End inside a cluster: the last one is zero padded when compressed.
      data = data .. string.rep("\x77", 9 * MiB - 3 * KiB - #data)
      h.write_file(raw, data)
      src = dir .. "/many.qcow2"
      h.qemu_img("convert -f raw -O qcow2 " .. h.q(raw) .. " " .. h.q(src))
      h.qemu_io(src, { "write -z 7M 512k" })
    end)

    for _, threads in ipairs({ 1, 2, 7 }) do
      it(("compressed with %d thread(s): the source's bytes, clean"):format(threads), function()
        local img = assert(qcow2.open(src))
        local out = dir .. "/many-c" .. threads .. ".qcow2"
        assert.is_true(img:convert(out, { compress = true, threads = threads }))
        img:close()
        assert.equal(0, qemu_compare(src, out))
        local check = h.check_json(out)
        assert.equal(0, check.corruptions or 0)
        assert.equal(0, check.leaks or 0)
        assert.is_true((check["compressed-clusters"] or 0) > 0)
        assert.is_true(size_of(out) < size_of(src))
      end)
    end

    it("plain qcow2 (4 KiB clusters) and raw (synced by cache = 'writeback'): the source's bytes", function()
      local img = assert(qcow2.open(src))
      local q, r = dir .. "/many.qcow2.out", dir .. "/many.raw.out"
      assert.is_true(img:convert(q, { cluster_size = 4096 }))
      assert.is_true(img:convert(r, { format = "raw", cache = "writeback" }))
      img:close()
      assert.equal(0, qemu_compare(src, q))
      assert.equal(0, qemu_compare(src, r, "-F raw"))
      assert.equal(0, h.check_json(q).corruptions or 0)
    end)
  end)

  it("uses no more disk blocks than qemu-img's own convert of a sparse image", function()
    local src = dir .. "/sparse.qcow2"
    h.create(src, 64 * MiB)
    h.qemu_io(src, { "write -P 0x11 0 64k", "write -P 0x22 10M 1M", "write -z 20M 4M",
      "write -P 0 30M 1M", "write -P 0x33 40M 8k", "write -P 0x44 63M 1M" })
    local img = assert(qcow2.open(src))
    for _, fmt in ipairs({ "qcow2", "raw" }) do
      local ours, theirs = dir .. "/sparse-ours." .. fmt, dir .. "/sparse-qemu." .. fmt
      assert.is_true(img:convert(ours, { format = fmt }))
      h.qemu_img("convert -O " .. fmt .. " " .. h.q(src) .. " " .. h.q(theirs))
      assert.equal(0, qemu_compare(src, ours, fmt == "raw" and "-F raw" or ""))
      assert.is_true(blocks(ours) <= blocks(theirs),
        ("%s: %d blocks, qemu-img's %d"):format(fmt, blocks(ours), blocks(theirs)))
    end
    img:close()
  end)

  describe("an interrupted convert leaves no file behind", function()
    local src
    setup(function()
      src = dir .. "/int.qcow2"
      h.create(src, 32 * MiB)
      h.qemu_io(src, { "write -P 0x11 0 8M", "write -P 0x22 16M 8M" })
    end)

    for _, fmt in ipairs({ "qcow2", "raw" }) do
      it("after a failing write (" .. fmt .. ")", function()
        local img = assert(qcow2.open(src))
        local out = dir .. "/int-fail." .. fmt
        local ok, msg, code = img:convert(out, { format = fmt, io = { fail_after_writes = fmt == "raw" and 1 or 7 } })
        img:close()
        assert.is_nil(ok)
        assert.equal("io", code)
        assert.is_string(msg)
        assert.is_false(exists(out))
      end)
    end

    it("after a failing write with compression under way (qcow2, compressed)", function()
      local img = assert(qcow2.open(src))
      local out = dir .. "/int-fail-c.qcow2"
      local ok, msg, code = img:convert(out, { compress = true, threads = 3, io = { fail_after_writes = 40 } })
      img:close()
      assert.is_nil(ok)
      assert.equal("io", code)
      assert.is_string(msg)
      assert.is_false(exists(out))
    end)

    it("when the progress function raises, the error propagates", function()
      local img = assert(qcow2.open(src))
      local out = dir .. "/int-raise.qcow2"
      local calls = 0
      local ok, err = pcall(img.convert, img, out, { progress = function(done)
        calls = calls + 1
        if done > 0 then error("stop here") end
      end })
      img:close()
      assert.is_false(ok)
      assert.matches("stop here", tostring(err))
      assert.is_false(exists(out))
      assert.is_true(calls >= 1)
    end)
  end)

  -- qemu-img convert's default cache mode for the output is "unsafe":
  -- never synced. The syscalls say which mode ran (strace).
  it("leaves the output unsynced by default (qemu-img's -t unsafe); cache = 'writeback' syncs it", function()
    if not h.sh("command -v strace") then pending("strace is not installed") return end
    local src = dir .. "/sync.qcow2"
    h.create(src, 4 * MiB)
    h.qemu_io(src, { "write -P 0x11 0 3M" })
    local function syncs(cache)
      local out, log = dir .. "/sync-" .. (cache or "default") .. ".raw", dir .. "/sync.strace"
      local script = ("local q = require 'qcow2'; local img = assert(q.open(%q)); "
        .. "assert(img:convert(%q, { format = 'raw', cache = %s }))")
        :format(src, out, cache and ("%q"):format(cache) or "nil")
      h.must(("strace -f -qq -e trace=fsync,fdatasync -o %s %s -e %s")
        :format(h.q(log), os.getenv("LUA") or "lua5.4", h.q(script)))
      assert.equal(0, qemu_compare(src, out, "-F raw"))
      local n = 0
      for line in io.lines(log) do if line:match("f%a*sync%(") then n = n + 1 end end
      return n
    end
    assert.equal(0, syncs(nil))
    assert.equal(0, syncs("unsafe"))
    assert.is_true(syncs("writeback") >= 1)
    assert.is_true(syncs("writethrough") >= 1)
  end)

  it("calls progress with increasing bytes done, ending at the total", function()
    local src = dir .. "/prog.qcow2"
    h.create(src, 16 * MiB)
    h.qemu_io(src, { "write -P 0x11 0 16M" })
    local img = assert(qcow2.open(src))
    local seen = {}
    assert.is_true(img:convert(dir .. "/prog.raw", { format = "raw",
      progress = function(done, total) seen[#seen + 1] = { done, total } end }))
    img:close()
    assert.is_true(#seen >= 2)
    assert.same({ 0, 16 * MiB }, seen[1])
    assert.same({ 16 * MiB, 16 * MiB }, seen[#seen])
    for i = 2, #seen do assert.is_true(seen[i][1] >= seen[i - 1][1]) end
  end)

  describe("with backing_file (qemu-img convert -B)", function()
    it("writes only what differs from the backing file, reading as qemu-img's overlay", function()
      local base = dir .. "/b-base.qcow2"
      h.create(base, 8 * MiB)
      h.qemu_io(base, { "write -P 0x11 0 4M", "write -P 0x12 6M 1M" })
      local top = dir .. "/b-top.qcow2"
      h.create(top, 8 * MiB, nil, "b-base.qcow2", "qcow2")
      h.qemu_io(top, { "write -P 0x21 64k 64k", "write -z 1M 128k", "write -P 0x11 2M 64k",
        "write -P 0x22 5M 100k" })
      local img = assert(qcow2.open(top))
      local ours, theirs = dir .. "/b-ours.qcow2", dir .. "/b-qemu.qcow2"
      assert.is_true(img:convert(ours, { backing_file = "b-base.qcow2", backing_format = "qcow2" }))
      img:close()
      h.qemu_img("convert -O qcow2 -B b-base.qcow2 -F qcow2 " .. h.q(top) .. " " .. h.q(theirs))
      assert.equal(0, qemu_compare(ours, theirs))
      assert.equal(0, qemu_compare(ours, top))
      assert.equal("b-base.qcow2", h.info_json(ours)["backing-filename"])
      assert.equal(0, h.check_json(ours).corruptions or 0)
      -- Allocated at depth 0: exactly the clusters where top differs from
      -- base (the 0x11 rewrite at 2M equals the base: not copied).
      local allocated = {}
      for _, r in ipairs(h.map_json(ours)) do
        if r.depth == 0 and r.present then
          for c = r.start // (64 * KiB), (r.start + r.length - 1) // (64 * KiB) do allocated[c] = true end
        end
      end
      local want = { [1] = true, [16] = true, [17] = true, [80] = true, [81] = true }
      assert.same(want, allocated)
    end)

    it("compressed: the differing clusters, zero ones hiding the backing's bytes", function()
      local top = dir .. "/b-top.qcow2"
      local img = assert(qcow2.open(top))
      local ours = dir .. "/b-ours-c.qcow2"
      assert.is_true(img:convert(ours, { backing_file = "b-base.qcow2", backing_format = "qcow2",
        compress = true }))
      img:close()
      assert.equal(0, qemu_compare(ours, top))
      local check = h.check_json(ours)
      assert.equal(0, check.corruptions or 0)
      assert.equal(0, check.leaks or 0)
      assert.is_true((check["compressed-clusters"] or 0) > 0)
    end)
  end)

  it("refuses misuse: unknown options, create options for raw, compress for raw", function()
    local src = dir .. "/m.qcow2"
    h.create(src, 1 * MiB)
    local img = assert(qcow2.open(src))
    assert.has_error(function() img:convert(dir .. "/m1", { colour = "red" }) end)
    assert.has_error(function() img:convert(dir .. "/m2", { format = "raw", cluster_size = 4096 }) end)
    assert.has_error(function() img:convert(dir .. "/m3", { format = "vmdk" }) end)
    assert.has_error(function() img:convert(dir .. "/m4", { format = "raw", compress = true }) end)
    assert.has_error(function() img:convert(dir .. "/m5", { size = 5 }) end)
    assert.has_error(function() img:convert(dir .. "/m7", { format = "raw", cache = "none" }) end)
    assert.has_error(function() img:convert(dir .. "/m8", { cache = "fast" }) end)
    -- an existing output is refused unless overwrite, as create refuses
    h.write_file(dir .. "/m6", "keep")
    local ok, _, code = img:convert(dir .. "/m6", {})
    assert.is_nil(ok)
    assert.equal("exists", code)
    assert.equal("keep", h.read_file(dir .. "/m6"))
    assert.is_true(img:convert(dir .. "/m6", { overwrite = true }))
    img:close()
  end)
end)
