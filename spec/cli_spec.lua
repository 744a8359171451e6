-- The `qcow2` tool, run as a child process (lua5.4 lua/qcow2-cli) with the
-- LUA_PATH/LUA_CPATH `make test` exports, against qemu-img-made images:
-- its output is compared with qemu-img's (the oracle) for the same image.
local h = require "helpers"
local qcow2 = require "qcow2"


local TOOL = h.TOOL

-- Run the tool: stdout, stderr, exit status.
local run = h.run_tool

-- qemu-img with its stdout and exit status (stderr dropped).
local function qemu(args)
  local p = assert(io.popen("unset LD_PRELOAD; qemu-img " .. args .. " 2>/dev/null"))
  local out = p:read("a")
  local _, _, code = p:close()
  return out, code
end

local function blocks(path) return tonumber((h.must("stat -c %b " .. h.q(path)))) end

describe("qcow2 tool", function()
  local dir
  local imgs = {}
  setup(function()
    dir = h.tmpdir()
    local p = dir .. "/plain.qcow2"
    h.create(p, "10M")
    h.qemu_io(p, { "write -P 0xab 0 64k", "write -z 1M 64k", "write -P 3 5M 128k" })
    imgs.plain = p
    p = dir .. "/snaps.qcow2"
    h.create(p, "8M", "lazy_refcounts=on")
    h.qemu_io(p, { "write -P 1 0 256k" })
    h.qemu_img("snapshot -c first " .. h.q(p))
    h.qemu_io(p, { "write -P 2 64k 64k", "write -P 9 7M 64k" })
    h.qemu_img("snapshot -c second " .. h.q(p))
    h.qemu_io(p, { "write -P 4 128k 4k" })
    imgs.snaps = p
    p = dir .. "/top.qcow2"
    h.create(p, "10M", nil, imgs.plain, "qcow2")
    h.qemu_io(p, { "write -P 7 64k 64k" })
    imgs.top = p
    -- dirty: a lazy-refcounts v3 image with incompatible bit 0 poked on
    p = dir .. "/dirty.qcow2"
    h.create(p, "4M", "lazy_refcounts=on")
    h.qemu_io(p, { "write -P 5 0 64k" })
    local f = h.get_be64(p, 72)
    h.poke(p, 72, h.be64(f | 1))
    imgs.dirty = p
    p = dir .. "/v2.qcow2"
    h.create(p, "3M", "compat=0.10,cluster_size=4k")
    h.qemu_io(p, { "write -P 6 4k 8k" })
    imgs.v2 = p
    p = dir .. "/extl2.qcow2"
    h.create(p, "6M", "extended_l2=on,cluster_size=32k,compression_type=zstd,refcount_bits=8")
    h.qemu_io(p, { "write -P 8 4k 1k", "write -P 9 100k 64k" })
    imgs.extl2 = p
    p = dir .. "/bitmaps.qcow2"
    h.create(p, "16M")
    h.qemu_img("bitmap --add " .. h.q(p) .. " b0")
    h.qemu_img("bitmap --add -g 128k " .. h.q(p) .. " b1")
    h.qemu_img("bitmap --disable " .. h.q(p) .. " b1")
    imgs.bitmaps = p
    p = dir .. "/rc2.qcow2"
    h.create(p, "8M", "refcount_bits=2,cluster_size=512")
    h.qemu_io(p, { "write -P 1 0 64k" })
    h.qemu_img("snapshot -c s " .. h.q(p))
    h.qemu_io(p, { "write -P 2 1k 2k" })
    imgs.rc2 = p
    p = dir .. "/prealloc.qcow2"
    h.create(p, "2M", "preallocation=metadata")
    imgs.prealloc = p
    p = dir .. "/compressed.qcow2"
    h.create(p, "4M")
    h.qemu_io(p, { "write -c -P 1 0 64k", "write -P 2 1M 64k" })
    imgs.compressed = p
  end)
  teardown(h.cleanup)

  local INFO = { "plain", "snaps", "top", "dirty", "v2", "extl2", "bitmaps", "prealloc" }

  describe("info", function()
    for _, name in ipairs(INFO) do
      it("prints qemu-img info's text and JSON for " .. name, function()
        local p = imgs[name]
        local want = qemu("info " .. h.q(p))
        local out, err, code = run("info " .. h.q(p))
        assert.are.equal(0, code, err)
        assert.are.equal(want, out)
        -- JSON: the same object (no key excluded: actual-size is the
        -- file's allocated bytes, unchanged between the two runs) and
        -- the same text
        local wantj = qemu("info --output=json " .. h.q(p))
        local outj = run("info --output=json " .. h.q(p))
        assert.are.same(h.json.decode(wantj), h.json.decode(outj))
        assert.are.equal(wantj, outj)
        assert.are.equal(outj, (run("info --json " .. h.q(p))))
      end)
    end

    it("prints the cleanly-shut-down line of a dirty image, and not otherwise", function()
      assert.matches("\ncleanly shut down: no\n", (run("info " .. h.q(imgs.dirty))))
      assert.not_matches("cleanly", (run("info " .. h.q(imgs.plain))))
    end)

    it("describes a backing chain as qemu-img info --backing-chain", function()
      local p = h.q(imgs.top)
      assert.are.equal(qemu("info --backing-chain " .. p), (run("info --backing-chain " .. p)))
      local want = qemu("info --backing-chain --output=json " .. p)
      local out = run("info --backing-chain --output=json " .. p)
      assert.are.same(h.json.decode(want), h.json.decode(out))
      assert.are.equal(want, out)
    end)
  end)

  describe("map", function()
    for _, name in ipairs({ "plain", "snaps", "top", "extl2", "prealloc", "v2" }) do
      it("prints qemu-img map's JSON and human table for " .. name, function()
        local p = h.q(imgs[name])
        local want = qemu("map --output=json " .. p)
        local out, err, code = run("map --output=json " .. p)
        assert.are.equal(0, code, err)
        assert.are.same(h.json.decode(want), h.json.decode(out))
        assert.are.equal(want, out)
        assert.are.equal(qemu("map " .. p), (run("map " .. p)))
      end)
    end

    it("fails on compressed clusters in the human format, as qemu-img does", function()
      local p = h.q(imgs.compressed)
      local want, want_code = qemu("map " .. p)
      local out, err, code = run("map " .. p)
      assert.are.equal(want_code, code)
      assert.are.equal(want, out)
      assert.matches("compressed clusters", err)
      assert.are.equal(qemu("map --output=json " .. p), (run("map --json " .. p)))
    end)
  end)

  describe("check", function()
    -- leaky: a discarded cluster with its refcount set back to 1;
    -- corrupt: additionally a data cluster's refcount set to 0
    local function leaky(name)
      local p = dir .. "/" .. name .. ".qcow2"
      h.create(p, "64M")
      h.qemu_io(p, { "write 0 64k", "write 64k 64k", "discard 64k 64k" })
      local rb = h.get_be64(p, h.get_be64(p, 48))
      h.poke(p, rb + 2 * 6, h.be16(1))
      return p, rb
    end
    local function corrupt()
      local p, rb = leaky("corrupt")
      h.poke(p, rb + 2 * 5, h.be16(0))
      return p
    end

    local function agree(p, expected)
      local want_text, want_code = qemu("check " .. h.q(p))
      local out, _, code = run("check " .. h.q(p))
      assert.are.equal(expected, want_code)
      assert.are.equal(want_code, code)
      assert.are.equal(want_text, out)
      local want_json = qemu("check --output=json " .. h.q(p))
      local outj, _, codej = run("check --output=json " .. h.q(p))
      assert.are.equal(want_code, codej)
      assert.are.same(h.json.decode(want_json), h.json.decode(outj))
      assert.are.equal(want_json, outj)
    end

    it("exits 0 with qemu-img's text and JSON on a clean image", function()
      agree(imgs.snaps, 0)
    end)
    it("exits 3 on leaks only, as qemu-img", function()
      agree((leaky("leaky")), 3)
    end)
    it("exits 2 on corruptions, as qemu-img", function()
      agree(corrupt(), 2)
    end)

    it("repairs leaks with -r leaks as qemu-img check -r leaks", function()
      local p = leaky("repair")
      local oracle = dir .. "/repair-oracle.qcow2"
      h.copy(p, oracle)
      local want_text, want_code = qemu("check -r leaks " .. h.q(oracle))
      local out, _, code = run("check -r leaks " .. h.q(p))
      assert.are.equal(want_code, code)
      assert.are.equal(0, code)
      assert.are.equal(want_text, out)
      assert.are.equal(0, select(2, qemu("check " .. h.q(p))))
    end)

    it("leaves the file untouched without -r", function()
      local p = leaky("ro")
      local before = h.sha256_file(p)
      run("check " .. h.q(p))
      assert.are.equal(before, h.sha256_file(p))
    end)
  end)

  describe("create", function()
    local SETS = {
      "",
      "-o cluster_size=4k,lazy_refcounts=on,refcount_bits=8",
      "-o compat=0.10",
      "-o preallocation=metadata -o cluster_size=2M",
      "-o extended_l2=on,compression_type=zstd",
      "-o refcount_bits=64,lazy_refcounts=true,compat=v3,preallocation=full",
      "-b BASE -F qcow2",
    }
    for i, opts in ipairs(SETS) do
      it("makes the bytes qemu-img create makes with " .. (opts == "" and "no options" or opts), function()
        local a, b = dir .. "/c" .. i .. "-oracle.qcow2", dir .. "/c" .. i .. ".qcow2"
        opts = opts:gsub("BASE", h.q(imgs.plain))
        local size = opts:match("%-b") and "" or " 5M"
        local want = h.qemu_img("create -f qcow2 " .. opts .. " " .. h.q(a) .. size)
        local out, err, code = run("create -f qcow2 " .. opts .. " " .. h.q(b) .. size)
        assert.are.equal(0, code, err)
        assert.are.equal(want:gsub(a:gsub("%p", "%%%0"), b), out)
        assert.are.equal(h.sha256_file(a), h.sha256_file(b))
      end)
    end

    it("refuses unknown -o names and bad values (status 1) and bad sizes (2)", function()
      local _, err, code = run("create -o nonsense=1 " .. h.q(dir .. "/bad.qcow2") .. " 1M")
      assert.are.equal(1, code)
      assert.matches("Invalid parameter 'nonsense'", err)
      assert.are.equal(1, select(3, run("create -o lazy_refcounts=maybe " .. h.q(dir .. "/bad.qcow2") .. " 1M")))
      assert.are.equal(2, select(3, run("create " .. h.q(dir .. "/bad.qcow2") .. " 12Q")))
    end)
  end)

  describe("snapshot", function()
    it("lists snapshots as qemu-img snapshot -l", function()
      local p = h.q(imgs.snaps)
      local out, _, code = run("snapshot -l " .. p)
      assert.are.equal(0, code)
      assert.are.equal(qemu("snapshot -l " .. p), out)
      assert.are.equal("", (run("snapshot -l " .. h.q(imgs.plain))))
    end)

    it("creates, applies and deletes snapshots qemu-img sees", function()
      local p = dir .. "/snapw.qcow2"
      h.copy(imgs.snaps, p)
      local before = h.raw_bytes(p)
      assert.are.equal(0, select(3, run("snapshot -c mine " .. h.q(p))))
      assert.matches("mine", qemu("snapshot -l " .. h.q(p)))
      h.qemu_io(p, { "write -P 0x55 0 1M" })
      assert.are_not.equal(before, h.raw_bytes(p))
      assert.are.equal(0, select(3, run("snapshot -a mine " .. h.q(p))))
      assert.are.equal(before, h.raw_bytes(p))
      assert.are.equal(h.raw_bytes(p, "first"), h.raw_bytes(imgs.snaps, "first"))
      assert.are.equal(0, select(3, run("snapshot -d first " .. h.q(p))))
      local list = qemu("snapshot -l " .. h.q(p))
      assert.not_matches(" first ", list)
      assert.matches(" second ", list)
      assert.are.equal(0, select(2, qemu("check " .. h.q(p))))
      local _, err, code = run("snapshot -d nosuch " .. h.q(p))
      assert.are.equal(1, code)
      assert.matches("^qcow2: Could not delete snapshot 'nosuch'", err)
    end)
  end)

  describe("digest", function()
    it("equals sha256sum of qemu-img convert -O raw, through a chain", function()
      for _, name in ipairs({ "plain", "top", "extl2", "compressed" }) do
        local raw = dir .. "/" .. name .. ".raw"
        h.qemu_img("convert -O raw " .. h.q(imgs[name]) .. " " .. h.q(raw))
        local out, err, code = run("digest " .. h.q(imgs[name]))
        assert.are.equal(0, code, err)
        assert.are.equal(h.sha256_file(raw) .. "\n", out)
        local md5 = h.must("md5sum " .. h.q(raw)):match("^%x+")
        assert.are.equal(md5 .. "\n", (run("digest --algo md5 " .. h.q(imgs[name]))))
        assert.are.equal(md5 .. "\n", (run("digest " .. h.q(imgs[name]) .. " md5")))
      end
    end)

    it("digests a snapshot's view as qemu-img convert -l snapshot.name", function()
      local raw = dir .. "/first.raw"
      h.qemu_img("convert -O raw -l snapshot.name=first " .. h.q(imgs.snaps) .. " " .. h.q(raw))
      assert.are.equal(h.sha256_file(raw) .. "\n", (run("digest --snapshot first " .. h.q(imgs.snaps))))
      assert.are.equal(1, select(3, run("digest --snapshot nosuch " .. h.q(imgs.snaps))))
    end)
  end)

  describe("export", function()
    local function agree(p, snap)
      local raw, mine = dir .. "/oracle.raw", dir .. "/mine.raw"
      os.remove(raw)
      h.qemu_img("convert -O raw " .. (snap and ("-l snapshot.name=" .. snap .. " ") or "")
                 .. h.q(p) .. " " .. h.q(raw))
      local out, err, code = run("export " .. (snap and ("--snapshot " .. snap .. " ") or "")
                                 .. h.q(p) .. " " .. h.q(mine))
      assert.are.equal(0, code, err)
      assert.are.equal("", out)
      assert.are.equal(h.sha256_file(raw), h.sha256_file(mine))
      assert.is_true(blocks(mine) <= blocks(raw), ("%d > %d blocks"):format(blocks(mine), blocks(raw)))
      return mine
    end

    it("writes qemu-img convert -O raw's bytes, no less sparse", function()
      local p = dir .. "/sparse.qcow2"
      h.create(p, "40M", "cluster_size=4k")
      -- data, a zero range, all-zero data, a short write, compressed, a tail
      h.qemu_io(p, { "write -P 5 0 100k", "write -z 200k 64k", "write -P 0 300k 1M",
                     "write -P 9 3000k 3k", "write -c -P 3 8M 4k", "write -P 1 39M 1M" })
      agree(p)
      for _, name in ipairs({ "top", "extl2", "compressed", "prealloc", "v2" }) do
        agree(imgs[name])
      end
      -- an unallocated tail stays a hole
      local mine = agree(imgs.plain)
      assert.are.equal(10 * 1024 * 1024, tonumber((h.must("stat -c %s " .. h.q(mine)))))
    end)

    it("exports a snapshot's view as qemu-img convert -l snapshot.name", function()
      agree(imgs.snaps, "first")
      agree(imgs.snaps, "second")
    end)
  end)

  describe("dump", function()
    it("gives the header's values and raw bytes", function()
      local p = imgs.snaps
      local out, err, code = run("dump --header --extensions --json " .. h.q(p))
      assert.are.equal(0, code, err)
      local d = h.json.decode(out)
      local img <close> = assert(qcow2.open(p, { force_share = true }))
      local hdr = img:header()
      local widths = { magic = 4, version = 4, backing_file_offset = 8, backing_file_size = 4,
        cluster_bits = 4, size = 8, crypt_method = 4, l1_size = 4, l1_table_offset = 8,
        refcount_table_offset = 8, refcount_table_clusters = 4, nb_snapshots = 4,
        snapshots_offset = 8, incompatible_features = 8, compatible_features = 8,
        autoclear_features = 8, refcount_order = 4, header_length = 4 }
      local offsets = { magic = 0, version = 4, backing_file_offset = 8, backing_file_size = 16,
        cluster_bits = 20, size = 24, crypt_method = 32, l1_size = 36, l1_table_offset = 40,
        refcount_table_offset = 48, refcount_table_clusters = 56, nb_snapshots = 60,
        snapshots_offset = 64, incompatible_features = 72, compatible_features = 80,
        autoclear_features = 88, refcount_order = 96, header_length = 100 }
      for name, width in pairs(widths) do
        assert.are.equal(hdr[name], math.tointeger(d.header[name]), name)
        local raw = h.peek(p, offsets[name], width)
        assert.are.equal((string.unpack(">I" .. width, raw)), math.tointeger(d.header[name]), name)
      end
      assert.are.same(hdr.features.compatible, d.header.features.compatible)
      assert.are.equal(#hdr.extensions, #d.extensions)
      for i, e in ipairs(hdr.extensions) do
        assert.are.equal(e.magic, math.tointeger(d.extensions[i].magic))
        local data = h.peek(p, e.offset, e.length)
        assert.are.equal(data:gsub(".", function(c) return ("%02x"):format(c:byte()) end),
                         d.extensions[i].data)
      end
      assert.matches("compatible features%s+lazy refcounts", (run("dump " .. h.q(p))))
    end)

    it("gives L1, L2, refcount and snapshot tables as stored", function()
      for _, name in ipairs({ "snaps", "extl2", "v2", "compressed", "rc2" }) do
        local p = imgs[name]
        local out, err, code = run("dump --all --json " .. h.q(p))
        assert.are.equal(0, code, err)
        local d = h.json.decode(out)
        local img <close> = assert(qcow2.open(p, { force_share = true, backing = false }))
        local hdr = img:header()
        -- L1: every non-zero raw word at l1_table_offset, nothing else
        local l1, seen = img:l1(), 0
        for _, e in ipairs(d.l1.entries) do
          local raw = h.get_be64(p, hdr.l1_table_offset + 8 * e.index)
          assert.are.equal(("0x%016x"):format(raw), e.raw)
          assert.are.equal(l1[e.index + 1], raw)
          seen = seen + 1
        end
        local nonzero = 0
        for _, v in ipairs(l1) do if v ~= 0 then nonzero = nonzero + 1 end end
        assert.are.equal(nonzero, seen)
        -- L2: raw words equal img:l2 and the file
        assert.are.equal(nonzero, #(d.l2 or {}))
        for _, t in ipairs(d.l2 or {}) do
          local words = img:l2(t.l1_index)
          local base = h.get_be64(p, hdr.l1_table_offset + 8 * t.l1_index) & 0x00fffffffffffe00
          local per = (hdr.incompatible_features & 16) ~= 0 and 2 or 1
          for _, e in ipairs(t.entries) do
            assert.are.equal(("0x%016x"):format(words[e.index * per + 1]), e.raw)
            assert.are.equal(words[e.index * per + 1], h.get_be64(p, base + 8 * per * e.index))
          end
        end
        -- refcounts: every cluster of the file, against img:refcount
        local cs = 1 << hdr.cluster_bits
        local listed = {}
        for _, b in ipairs(d.refcount_blocks) do
          for _, r in ipairs(b.refcounts) do listed[math.tointeger(r.cluster)] = math.tointeger(r.refcount) end
        end
        local size = tonumber((h.must("stat -c %s " .. h.q(p))))
        for c = 0, (size + cs - 1) // cs - 1 do
          assert.are.equal(img:refcount(c), listed[c] or 0, name .. " cluster " .. c)
        end
        assert.are.equal(hdr.refcount_table_offset, math.tointeger(d.refcount_table.offset))
        -- snapshots
        local snaps = img:snapshots()
        assert.are.equal(#snaps, #d.snapshots)
        for i, s in ipairs(snaps) do
          assert.are.equal(s.name, d.snapshots[i].name)
          assert.are.equal(s.l1_table_offset, math.tointeger(d.snapshots[i].l1_table_offset))
        end
      end
    end)

    it("fails with one line on an L2 index outside the L1 table", function()
      local _, err, code = run("dump --l2 999 " .. h.q(imgs.plain))
      assert.are.equal(1, code)
      assert.matches("^qcow2: [^\n]*L1 index 999[^\n]*\n$", err)
    end)
  end)

  describe("usage and statuses", function()
    local COMMANDS = { "info", "map", "check", "snapshot", "create", "digest", "export", "dump", "read" }
    it("gives --help for every subcommand (status 0)", function()
      for _, c in ipairs(COMMANDS) do
        local out, _, code = run(c .. " --help")
        assert.are.equal(0, code, c)
        assert.matches("^usage: qcow2 " .. c, out)
        assert.matches("\n  " .. c .. " ", (run("--help")))
      end
    end)

    it("exits 2 on an unknown subcommand, option or missing argument", function()
      local _, err, code = run("frobnicate x")
      assert.are.equal(2, code)
      assert.matches("unknown command 'frobnicate'", err)
      for _, args in ipairs({ "info --bogus x", "map -z x", "check -r some x", "export x",
                              "snapshot x", "info", "dump --l2 x y", "" }) do
        assert.are.equal(2, select(3, run(args)), args)
      end
    end)

    it("exits 1 with one line on stderr when the image cannot be read", function()
      local _, err, code = run("info " .. h.q(dir .. "/missing.qcow2"))
      assert.are.equal(1, code)
      assert.matches("^qcow2: [^\n]+\n$", err)
    end)
  end)

  describe("progress", function()
    it("is never shown when stderr is not a terminal", function()
      local _, err = run("export " .. h.q(imgs.plain) .. " " .. h.q(dir .. "/p.raw"),
                         "QCOW2_PROGRESS_DELAY=0")
      assert.are.equal("", err)
      _, err = run("digest " .. h.q(imgs.plain), "QCOW2_PROGRESS_DELAY=0")
      assert.are.equal("", err)
    end)

    it("is a line on a terminal's stderr, cleared at the end", function()
      local ok = h.sh("command -v script")
      if not ok then pending("script(1) is not installed") return end
      local cmd = ("QCOW2_PROGRESS_DELAY=0 %s export %s %s"):format(TOOL, h.q(imgs.plain),
                                                                 h.q(dir .. "/tty.raw"))
      local out = h.must("script -qec " .. h.q(cmd) .. " /dev/null")
      assert.matches("\rexport [^\r]*100%.0%% %(10 MiB of 10 MiB%)", out)
      assert.matches("\r\27%[K", out)
      -- digest reports through img:digest's progress hook
      out = h.must("script -qec " .. h.q("QCOW2_PROGRESS_DELAY=0 " .. TOOL .. " digest "
                                          .. h.q(imgs.plain)) .. " /dev/null")
      assert.matches("\rsha256 [^\r]*100%.0%% %(10 MiB of 10 MiB%)", out)
    end)
  end)

  describe("packaging", function()
    it("lists every subcommand module in the rockspec and installs it with make install", function()
      local env = {}
      assert(loadfile("rockspec/lua-qcow2-scm-1.rockspec", "t", env))()
      local mods = env.build.modules
      for f in h.must("ls lua/qcow2/cli/*.lua"):gmatch("%S+") do
        local name = f:match("lua/qcow2/cli/(.-)%.lua$")
        assert.are.equal(f, mods["qcow2.cli." .. name], name)
      end
      local dest = h.tmpdir()
      h.must("make -s install PREFIX=/usr DESTDIR=" .. h.q(dest))
      for f in h.must("ls lua/qcow2/cli/*.lua"):gmatch("%S+") do
        local base = f:match("[^/]+$")
        assert.are.equal(h.read_file(f), h.read_file(dest .. "/usr/share/lua/5.4/qcow2/cli/" .. base))
      end
    end)
  end)
end)
