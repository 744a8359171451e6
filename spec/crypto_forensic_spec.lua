-- The forensic calls on encrypted images: owners names the LUKS header
-- where the full-disk-encryption extension puts it, and residue hands out
-- only ciphertext (a plaintext marker written through the library and then
-- discarded is in the file, encrypted, and never in clear).
local h = require "helpers"
local qcow2 = require "qcow2"

local PASS = "forensic passphrase"
local MARKER = "PLAINTEXT-MARKER-0123456789"

describe("forensics on a LUKS image", function()
  teardown(h.cleanup)

  local function luks_image()
    local p = h.tmpdir() .. "/luks.qcow2"
    h.create_luks(p, "4M", PASS)
    return p
  end

  it("owners names the crypto header at the extension's offset and length", function()
    local p = luks_image()
    local img <close> = assert(qcow2.open(p, { key = PASS }))
    local ext
    for _, e in ipairs(img:header().extensions) do
      if e.magic == 0x0537be77 then ext = e end
    end
    assert.is_truthy(ext, "no full-disk-encryption header extension")
    local offset, length = string.unpack(">I8I8", ext.data)
    local covered = 0
    for _, o in ipairs(img:owners()) do
      if o.owner == "crypto_header" then
        assert.is_true(o.offset >= offset and o.offset + o.length <= offset + length
          + img.cluster_size)     -- the rest of its last cluster is its slack
        covered = covered + o.length
      else
        -- nothing else claims bytes of the LUKS region
        assert.is_true(o.offset + o.length <= offset or o.offset >= offset + length,
          ("%s at 0x%x overlaps the LUKS header"):format(o.owner, o.offset))
      end
    end
    assert.is_true(covered >= length)
  end)

  it("residue of a discarded cluster holds ciphertext only", function()
    local p = luks_image()
    do
      local img <close> = assert(qcow2.open(p, { key = PASS, mode = "rw" }))
      assert(img:write(0, string.rep(MARKER, 2400)))       -- ~64 KiB of it
      assert(img:flush())
      local back = assert(img:read(0, #MARKER))
      assert.are.equal(MARKER, back)
    end
    -- the plaintext is nowhere in the file, before and after the discard
    local function file_has_marker()
      local f = assert(io.open(p, "rb"))
      local all = f:read("a")
      f:close()
      return all:find(MARKER, 1, true) ~= nil
    end
    assert.is_false(file_has_marker())
    -- drop the L2 entry's reference the way a guest trim does, leaving the
    -- encrypted bytes in a free cluster
    do
      local img <close> = assert(qcow2.open(p, { key = PASS, mode = "rw" }))
      assert(img:discard(0, 65536))
    end
    local img <close> = assert(qcow2.open(p, { key = PASS }))
    local found = 0
    for _, r in ipairs(img:residue()) do
      local bytes = img:raw_read(r.offset, r.length)
      assert.is_nil(bytes:find(MARKER, 1, true), "plaintext in residue at " .. r.offset)
      if r.kind == "free" or r.kind == "leaked" or r.kind == "tail" then
        found = found + r.length
        assert.is_true(r.entropy > 7, "ciphertext looks random: " .. r.entropy)
      end
    end
    assert.is_true(found > 0, "the discarded cluster's ciphertext is residue")
    assert.is_false(file_has_marker())
  end)
end)
