-- qcow2.compare and `qcow2 compare` against qemu-img compare (the
-- oracle): the same verdict and the same first offset on equal,
-- different and different-size pairs, strict and not.
local h = require "helpers"
local qcow2 = require "qcow2"

local MiB = 1024 * 1024

-- qemu-img compare: exit status and the offset its message names.
local function qemu_compare(a, b, strict)
  local ok, out, code = h.sh("qemu-img compare " .. (strict and "-s " or "") .. h.q(a) .. " " .. h.q(b))
  local offset = out:match("[Oo]ffset (%d+)")
  return ok and 0 or code, offset and tonumber(offset), out
end

local function tool(args)
  local ok, out, code = h.sh((os.getenv("LUA") or "lua5.4") .. " lua/qcow2-cli compare " .. args)
  return ok and 0 or code, out
end

describe("qcow2.compare", function()
  local dir, pairs_ = nil, {}
  setup(function()
    dir = h.tmpdir()
    local function img(name, size, cmds, opts, backing)
      local p = dir .. "/" .. name
      h.create(p, size, opts, backing, backing and "qcow2")
      if cmds then h.qemu_io(p, cmds) end
      return p
    end
    local a = img("a.qcow2", 4 * MiB, { "write -P 1 0 1M", "write -P 2 2M 64k" })
    local same = img("same.qcow2", 4 * MiB, { "write -P 1 0 1M", "write -P 2 2M 64k" }, "cluster_size=4k")
    local diff = img("diff.qcow2", 4 * MiB, { "write -P 1 0 1M", "write -P 2 2M 64k", "write -P 9 1500000 1" })
    local zero = img("zero.qcow2", 4 * MiB, { "write -P 1 0 1M", "write -P 2 2M 64k", "write -z 3M 64k" })
    local long0 = img("long0.qcow2", 6 * MiB, { "write -P 1 0 1M", "write -P 2 2M 64k" })
    local long1 = img("long1.qcow2", 6 * MiB, { "write -P 1 0 1M", "write -P 2 2M 64k", "write -P 7 5M 3" })
    local over = img("over.qcow2", 4 * MiB, { "write -P 3 100 1" }, nil, "a.qcow2")
    local raw = dir .. "/a.raw"
    h.qemu_img("convert -O raw " .. h.q(a) .. " " .. h.q(raw))
    pairs_ = {
      { "equal images of other cluster sizes", a, same },
      { "a byte differing mid-disk", a, diff },
      { "a zero cluster against unallocated", a, zero },
      { "a longer image with a zero tail", a, long0 },
      { "a longer image with data in its tail", a, long1 },
      { "an overlay against its backing file", over, a },
      { "a qcow2 image against its raw copy", a, raw },
      { "the same image twice", a, a },
    }
  end)
  teardown(function() h.cleanup() end)

  for i, name in ipairs({ "equal images of other cluster sizes", "a byte differing mid-disk",
      "a zero cluster against unallocated", "a longer image with a zero tail",
      "a longer image with data in its tail", "an overlay against its backing file",
      "a qcow2 image against its raw copy", "the same image twice" }) do
    for _, strict in ipairs({ false, true }) do
      it(("agrees with qemu-img compare%s on %s"):format(strict and " -s" or "", name), function()
        local p = pairs_[i]
        local code, offset = qemu_compare(p[2], p[3], strict)
        assert.is_true(code == 0 or code == 1)
        local ok, off, why = qcow2.compare(p[2], p[3], { strict = strict })
        assert.equal(code == 0, ok)
        if not ok and why ~= "size" then assert.equal(offset, off) end
        -- the tool: qemu-img's exit status and message
        local tcode, tout = tool((strict and "-s " or "") .. h.q(p[2]) .. " " .. h.q(p[3]))
        local _, _, qout = qemu_compare(p[2], p[3], strict)
        assert.equal(code, tcode)
        assert.equal(qout, tout)
      end)
    end
  end

  it("takes open Images (a snapshot view too) and reports failures", function()
    local a = assert(qcow2.open(dir .. "/a.qcow2"))
    local d = assert(qcow2.open(dir .. "/diff.qcow2"))
    local ok, off, why = qcow2.compare(a, d)
    assert.is_false(ok)
    assert.equal(1500000 // 512 * 512, off)
    assert.equal("content", why)
    assert.is_true(qcow2.compare(a, dir .. "/same.qcow2"))
    local n, msg, code = qcow2.compare(a, dir .. "/missing.qcow2")
    assert.is_nil(n)
    assert.equal("notfound", code)
    assert.is_string(msg)
    assert.has_error(function() qcow2.compare(a, 42) end)
    assert.has_error(function() qcow2.compare(a, d, { strcit = true }) end)
    a:close()
    d:close()
    local code2 = tool(h.q(dir .. "/a.qcow2") .. " " .. h.q(dir .. "/missing.qcow2"))
    assert.equal(2, code2)
  end)
end)
