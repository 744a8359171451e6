-- Encryption: legacy AES and LUKS, both ways with qemu-img (the oracle),
-- cryptsetup as an independent check of the LUKS headers the library
-- writes, wrong and missing keys, and hostile LUKS headers.
local qcow2 = require("qcow2")
local h = require("helpers")

local KiB, MiB = 1024, 1024 * 1024
local PASS = "correct horse"

-- qemu-img/qemu-io arguments that open p with the passphrase.
local function qopts(p, pass)
  return ("--object secret,id=s0,data=%s --image-opts %s"):format(h.q(pass or PASS),
    h.q("driver=qcow2,file.filename=" .. p .. ",encrypt.key-secret=s0"))
end

-- The guest disk through qemu-img convert with the secret.
local function oracle_bytes(p)
  local out = p .. ".oracle.raw"
  h.must("qemu-img convert -O raw " .. qopts(p) .. " " .. h.q(out))
  local data = h.read_file(out)
  os.remove(out)
  return data
end

local function whole(img)
  return assert(img:read(0, img.size))
end

-- (offset, length) of the full-disk-encryption header extension.
local function luks_region(p)
  local d = h.read_file(p)
  local at = string.unpack(">I4", d, 101) -- header_length
  while at + 8 <= #d do
    local magic, len = string.unpack(">I4I4", d, at + 1)
    if magic == 0 then break end
    if magic == 0x0537BE77 then return string.unpack(">I8I8", d, at + 9) end
    at = at + 8 + (len + 7) // 8 * 8
  end
  error("no crypto header extension in " .. p)
end

local function qemu_check_clean(p)
  local ok, out = h.sh("qemu-img check --output=json " .. qopts(p), true)
  assert.is_true(ok, out)
  local res = h.json.decode(out)
  assert.are.equal(0, res.corruptions or 0)
  assert.are.equal(0, res.leaks or 0)
end

-- Writes that cover unaligned heads and tails, COW into a fresh cluster,
-- a long run and zeroes; the same applied to a model string.
local function scribble(img, model)
  local function put(off, data)
    assert(img:write(off, data))
    model = model:sub(1, off) .. data .. model:sub(off + #data + 1)
  end
  put(1000, ("Q"):rep(70000))
  put(300 * KiB + 7, "hello, sector")
  put(1 * MiB - 100, h.random_bytes(300 * KiB, 7))
  assert(img:write_zeroes(200 * KiB + 3, 5000))
  model = model:sub(1, 200 * KiB + 3) .. ("\0"):rep(5000) .. model:sub(200 * KiB + 5004)
  return model
end

describe("legacy AES (crypt_method 1)", function()
  local dir, p
  setup(function()
    dir = h.tmpdir()
    p = dir .. "/aes.qcow2"
    h.must("qemu-img create -q -f qcow2 --object secret,id=s0,data=" .. h.q(PASS) ..
      " -o encrypt.format=aes,encrypt.key-secret=s0 " .. h.q(p) .. " 2M")
    h.must("qemu-io " .. qopts(p) .. " -c 'write -P 0x5a 0 64k' -c 'write -P 0x33 100k 3k'" ..
      " -c 'write -P 0x77 1500k 200k'")
  end)
  teardown(h.cleanup)

  it("reads qemu-img's image as qemu-img convert does", function()
    local img = assert(qcow2.open(p, { key = PASS }))
    assert.are.equal(oracle_bytes(p), whole(img))
    img:close()
  end)

  it("refuses a missing key with 'key'; a wrong one cannot be detected", function()
    local img, msg, code = qcow2.open(p)
    assert.is_nil(img)
    assert.are.equal("key", code)
    assert.matches("encrypted", msg)
    img = assert(qcow2.open(p, { key = "wrong" }))
    assert.are_not.equal(oracle_bytes(p), whole(img))
    img:close()
  end)

  it("says in info that the key is not verified", function()
    local img = assert(qcow2.open(p, { key = PASS }))
    local info = img:info()
    assert.is_true(info.encrypted)
    local enc = info["format-specific"].data.encrypt
    assert.are.equal("aes", enc.format)
    assert.are.equal(false, enc.verified)
    img:close()
  end)

  it("writes what qemu-img reads back, and check stays clean", function()
    local q = dir .. "/aes-w.qcow2"
    h.copy(p, q)
    local img = assert(qcow2.open(q, { key = PASS, mode = "rw" }))
    local model = scribble(img, whole(img))
    assert.are.equal(model, whole(img))
    img:close()
    assert.are.equal(model, oracle_bytes(q))
    qemu_check_clean(q)
  end)

  it("creates images qemu-img opens, only when asked by name, without plaintext", function()
    local q = dir .. "/aes-new.qcow2"
    local img = assert(qcow2.create(q, { size = 2 * MiB, encrypt = { format = "aes", key = PASS } }))
    local marker = ("PLAINTEXT-MARKER-"):rep(500)
    assert(img:write(12345, marker))
    img:close()
    assert.is_nil(h.read_file(q):find("PLAINTEXT-MARKER", 1, true))
    local raw = oracle_bytes(q)
    assert.are.equal(marker, raw:sub(12346, 12345 + #marker))
    assert.are.equal(("\0"):rep(12345), raw:sub(1, 12345))
    assert.are.equal("aes", h.info_json(q)["format-specific"].data.encrypt.format)
    assert.has_error(function() qcow2.create(q, { size = MiB, encrypt = { key = PASS } }) end)
  end)
end)

-- qemu-img's LUKS images with several ciphers.
local CIPHERS = {
  { name = "aes-256-xts-plain64 sha256 (qemu-img's default)" },
  { name = "aes-128-cbc-essiv:sha256, hash sha1",
    opts = "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
      .. "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1" },
  { name = "aes-256-cbc-essiv:sha256",
    opts = "encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv" },
  { name = "aes-128-xts-plain64", opts = "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=xts" },
}

describe("LUKS made by qemu-img", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(h.cleanup)

  for i, c in ipairs(CIPHERS) do
    it("reads, writes and reports " .. c.name, function()
      local p = dir .. "/l" .. i .. ".qcow2"
      h.create_luks(p, "2M", PASS, c.opts)
      h.must("qemu-io " .. qopts(p) .. " -c 'write -P 0x5a 0 64k' -c 'write -P 0x33 100k 3k'")
      local want_bytes = oracle_bytes(p)
      -- info: the header facts, as qemu-img info shows them without a key
      local want = h.info_json(p)["format-specific"].data.encrypt
      local img = assert(qcow2.open(p, { key = PASS, mode = "rw" }))
      assert.are.equal(want_bytes, whole(img))
      local got = img:info()["format-specific"].data.encrypt
      assert.are.same(want, got)
      local model = scribble(img, whole(img))
      img:close()
      assert.are.equal(model, oracle_bytes(p))
      qemu_check_clean(p)
      local r = assert(qcow2.open(p, { key = PASS })):check()
      assert.is_true(r.ok)
    end)
  end

  it("refuses wrong and missing keys with 'key'", function()
    local p = dir .. "/l1.qcow2"
    local img, msg, code = qcow2.open(p, { key = "not the key" })
    assert.is_nil(img)
    assert.are.equal("key", code)
    assert.matches("wrong key", msg)
    img, msg, code = qcow2.open(p)
    assert.is_nil(img)
    assert.are.equal("key", code)
    assert.matches("no key", msg)
  end)

  it("amend keeps the encryption; re-encryption and downgrades are refused", function()
    local p = dir .. "/l2.qcow2"
    local want = oracle_bytes(p)
    local img = assert(qcow2.open(p, { key = PASS, mode = "rw" }))
    assert(img:amend({ lazy_refcounts = true }))
    local ok, msg, code = img:amend({ encrypt = { format = "luks", key = "new key" } })
    assert.is_nil(ok)
    assert.are.equal("unsupported", code)
    assert.matches("re-encryption", msg, 1, true)
    ok, msg, code = img:amend({ version = 2 })
    assert.is_nil(ok)
    assert.are.equal("unsupported", code)
    assert.matches("encrypted", msg, 1, true)
    img:close()
    assert.are.equal(want, oracle_bytes(p))
    assert.is_true(h.info_json(p)["format-specific"].data["lazy-refcounts"])
    qemu_check_clean(p)
  end)

  it("reads snapshot views with the parent's keys", function()
    local p = dir .. "/l1.qcow2"
    local img = assert(qcow2.open(p, { key = PASS, mode = "rw" }))
    local before = whole(img)
    local snap = assert(img:create_snapshot("s1"))
    assert(img:write(0, ("X"):rep(70000)))
    local view = assert(snap:open())
    assert.are.equal(before, whole(view))
    view:close()
    assert.are_not.equal(before, whole(img))
    img:close()
    local out = p .. ".s1.raw"
    h.must("qemu-img convert -O raw -l snapshot.name=s1 " .. qopts(p) .. " " .. h.q(out))
    assert.are.equal(before, h.read_file(out))
  end)
end)

describe("LUKS made by the library", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(h.cleanup)

  local function make(name, enc)
    local p = dir .. "/" .. name
    enc.format, enc.key, enc.iter_time = "luks", PASS, enc.iter_time or 10
    local img = assert(qcow2.create(p, { size = 2 * MiB, encrypt = enc }))
    return p, img
  end

  for _, c in ipairs({
    {},
    { cipher_alg = "aes-128", cipher_mode = "cbc", ivgen_alg = "essiv", hash_alg = "sha1" },
    { cipher_alg = "aes-256", cipher_mode = "cbc", ivgen_alg = "plain64", hash_alg = "sha512" },
  }) do
    it("writes a header cryptsetup and qemu-img accept: " .. (c.cipher_alg or "defaults"), function()
      local p, img = make("c.qcow2", c)
      local marker = ("PLAINTEXT-MARKER-"):rep(500)
      assert(img:write(12345, marker))
      img:close()
      assert.is_nil(h.read_file(p):find("PLAINTEXT-MARKER", 1, true))
      assert.are.equal(marker, oracle_bytes(p):sub(12346, 12345 + #marker))
      qemu_check_clean(p)
      local info = h.info_json(p)["format-specific"].data.encrypt
      assert.are.equal(c.cipher_alg or "aes-256", info["cipher-alg"])
      assert.are.equal(c.cipher_mode or "xts", info["cipher-mode"])
      assert.are.equal(c.hash_alg or "sha256", info["hash-alg"])
      -- the header region alone, to cryptsetup
      local off, len = luks_region(p)
      local hdr = dir .. "/hdr.luks"
      h.write_file(hdr, h.read_file(p):sub(off + 1, off + len))
      local dump = h.must("cryptsetup luksDump " .. h.q(hdr))
      assert.matches("Key Slot 0: ENABLED", dump, 1, true)
      assert.matches("AF stripes:%s+4000", dump)
      local ok = h.sh("printf %s " .. h.q(PASS) .. " | cryptsetup open --test-passphrase --key-file=- " .. h.q(hdr))
      assert.is_true(ok)
      ok = h.sh("printf %s wrong | cryptsetup open --test-passphrase --key-file=- " .. h.q(hdr))
      assert.is_false(ok)
      os.remove(p)
    end)
  end

  it("calibrates iterations to iter_time", function()
    local p, img = make("t.qcow2", { iter_time = 10 })
    img:close()
    local fast = h.info_json(p)["format-specific"].data.encrypt.slots[1].iters
    os.remove(p)
    p, img = make("t.qcow2", { iter_time = 200 })
    img:close()
    local slow = h.info_json(p)["format-specific"].data.encrypt.slots[1].iters
    assert.is_true(slow > 5 * fast, ("%d vs %d"):format(slow, fast))
  end)

  it("refuses preallocation and a missing key at create", function()
    local img, _, code = qcow2.create(dir .. "/x.qcow2", { size = MiB, preallocation = "metadata",
      encrypt = { format = "luks", key = PASS, iter_time = 10 } })
    assert.is_nil(img)
    assert.are.equal("unsupported", code)
    img, _, code = qcow2.create(dir .. "/x.qcow2", { size = MiB, encrypt = { format = "luks" } })
    assert.is_nil(img)
    assert.are.equal("invalid", code)
  end)
end)

describe("hostile LUKS headers", function()
  local dir, base, region
  setup(function()
    dir = h.tmpdir()
    base = dir .. "/base.qcow2"
    assert(qcow2.create(base, { size = MiB, encrypt = { format = "luks", key = PASS, iter_time = 10 } })):close()
    region = luks_region(base)
  end)
  teardown(h.cleanup)

  -- Each case pokes the header at (region + field offset) and expects the
  -- open to fail with code and a message matching pattern; with or
  -- without a key.
  local CASES = {
    { "bad magic", 0, "XXXX", "corrupt", "magic" },
    { "version 2", 6, h.be32 and string.pack(">I2", 2), "unsupported", "version" },
    { "key bytes the cipher does not take", 108, string.pack(">I4", 17), "corrupt", "master key length" },
    { "payload offset inside the header", 104, string.pack(">I4", 1), "corrupt", "inside the header" },
    { "absurd master-key iterations", 164, string.pack(">I4", 0xffffffff), "corrupt", "iterations" },
    { "absurd keyslot iterations", 208 + 4, string.pack(">I4", 0x7fffffff), "corrupt", "iterations" },
    { "stripes other than 4000", 208 + 44, string.pack(">I4", 3999), "corrupt", "stripes" },
    { "keyslot overlapping the header", 208 + 48 + 40, string.pack(">I4", 1), "corrupt", "overlaps the header" },
    { "keyslot past the payload (and EOF)", 208 + 40, string.pack(">I4", 0x10000000), "corrupt", "past the payload" },
    { "keyslots overlapping each other", 208 + 48 + 40, string.pack(">I4", 9), "corrupt", "overlap" },
  }
  for _, c in ipairs(CASES) do
    it("refuses " .. c[1], function()
      local p = dir .. "/bad.qcow2"
      h.copy(base, p)
      h.poke(p, region + c[2], c[3])
      for _, key in ipairs({ PASS, false }) do
        local img, msg, code = qcow2.open(p, key and { key = key } or nil)
        assert.is_nil(img)
        assert.are.equal(c[4], code, msg)
        assert.matches(c[5], msg, 1, true)
        assert.matches("LUKS", msg, 1, true)
      end
    end)
  end

  it("refuses key material cut off by the end of the file", function()
    local p = dir .. "/short.qcow2"
    local d = h.read_file(base)
    -- keep the header and slot 0's first sectors only
    h.write_file(p, d:sub(1, region + 8 * 512 + 1024))
    local img, msg, code = qcow2.open(p, { key = PASS })
    assert.is_nil(img)
    assert.are_not.equal("key", code)
    assert.is_string(msg)
  end)
end)

describe("the qcow2 tool with --key-file", function()
  local dir, p
  setup(function()
    dir = h.tmpdir()
    p = dir .. "/aes.qcow2"
    local img = assert(qcow2.create(p, { size = MiB, encrypt = { format = "aes", key = PASS } }))
    assert(img:write(0, ("K"):rep(4096)))
    img:close()
    h.write_file(dir .. "/key", PASS .. "\n")
  end)
  teardown(h.cleanup)

  local function tool(args)
    return h.sh(h.TOOL .. " " .. args, true)
  end

  it("reads an encrypted image with the key from a file only", function()
    local ok, out = tool("read --key-file " .. h.q(dir .. "/key") .. " " .. h.q(p) .. " 0 16")
    assert.is_true(ok, out)
    assert.matches("KKKK", out, 1, true)
    ok, out = tool("read " .. h.q(p) .. " 0 16")
    assert.is_false(ok)
    assert.matches("no key", out, 1, true)
    ok = tool("info --key-file " .. h.q(dir .. "/key") .. " " .. h.q(p))
    assert.is_true(ok)
    ok, out = tool("read --key " .. h.q(PASS) .. " " .. h.q(p) .. " 0 16")
    assert.is_false(ok)
    assert.matches("unknown option", out, 1, true)
  end)

  -- script(1) gives the tool a terminal; what is piped in is typed there,
  -- a moment later (typed before the prompt, a terminal echoes it)
  local function on_terminal(typed, args)
    return h.sh(("(sleep 1.5; printf '%%s\\n' %s) | script -qec %s /dev/null")
      :format(h.q(typed), h.q(h.TOOL .. " " .. args)), true)
  end

  it("asks for the passphrase on the terminal with echo off when there is no key file", function()
    local ok, out = on_terminal(PASS, "read " .. h.q(p) .. " 0 16")
    assert.is_true(ok, out)
    assert.matches("Passphrase for ", out, 1, true)
    assert.matches("KKKK", out, 1, true)
    assert.is_nil(out:find(PASS, 1, true), "the passphrase was echoed: " .. out)
    -- a legacy AES key cannot be verified: a wrong one reads other bytes
    ok, out = on_terminal("wrong", "read " .. h.q(p) .. " 0 16")
    assert.is_boolean(ok)
    assert.is_nil(out:find("KKKK", 1, true), out)
  end)
end)
