-- Power cuts during rebase and commit: each operation is traced once to
-- count its writes (commit's backing-file writes count in the overlay's
-- trace: the fault plan covers every file the handle opens for writing,
-- with one write count), then run on fresh copies for cut indexes k with
-- io = {stop_after_writes = k} and volatile caches (crash.plans). After
-- every cut qemu-img check and the library's check find no corruption in
-- any file written, and the overlay's guest disk reads as before.
-- Sampled for `make test`; every index and several seeds under
-- QCOW2_SWEEP=full.
local h = require("helpers")
local model = require("model")
local crash = require("crash")
local qcow2 = require("qcow2")

local MiB = 1024 * 1024
local SAMPLES = 10

describe("a power cut during", function()
  local dir, src
  setup(function()
    dir = h.tmpdir()
    src = dir .. "/src"
    h.must("mkdir -p " .. h.q(src))
    h.create(src .. "/base.qcow2", 2 * MiB, "cluster_size=4096")
    h.qemu_io(src .. "/base.qcow2", { "write -P 0x10 0 1M", "write -P 0x11 1536k 256k" })
    h.create(src .. "/new.qcow2", 2 * MiB, "cluster_size=4096")
    h.qemu_io(src .. "/new.qcow2", { "write -P 0x10 0 256k", "write -P 0x30 768k 512k" })
    h.create(src .. "/top.qcow2", 2 * MiB, "cluster_size=4096", "base.qcow2")
    h.qemu_io(src .. "/top.qcow2", { "write -P 0x20 64k 64k", "write -z 512k 32k",
                                     "write -P 0x21 1600k 6k", "write -P 0x22 1900k 64k" })
  end)
  teardown(h.cleanup)

  local function fresh()
    local work = dir .. "/work"
    h.must("rm -rf " .. h.q(work) .. " && cp -r " .. h.q(src) .. " " .. h.q(work))
    return work
  end

  local function digest(path)
    local img <close> = assert(qcow2.open(path))
    return assert(img:digest("sha256"))
  end

  -- op(img) on copies of src, swept over its writes; `files` are judged.
  -- dirty_ok: a cut may leave the overlay dirty (make_empty's fresh
  -- layout sets the dirty bit first, as QEMU's make_completely_empty
  -- does: its refcounts are then repaired at the next read-write open,
  -- which the judgement does first, as powercut_ops_spec's dirty case).
  local function sweep(name, op, files, dirty_ok)
    local work = fresh()
    local before = digest(work .. "/top.qcow2")
    local img = assert(qcow2.open(work .. "/top.qcow2", { mode = "rw", io = { trace = true } }))
    assert(op(img))
    local writes = crash.writes(img:io_log())
    img:close()
    for _, f in ipairs(files) do crash.judge(work .. "/" .. f, name .. " without a cut: " .. f) end
    assert.equal(before, digest(work .. "/top.qcow2"))
    assert.is_true(writes > 4, name .. ": only " .. writes .. " writes")
    crash.sweep(model.sample_indexes(writes + 1, SAMPLES), function(plan)
      local label = name .. ", " .. crash.describe(plan)
      work = fresh()
      local rw = assert(qcow2.open(work .. "/top.qcow2", { mode = "rw", io = plan }))
      op(rw)                        -- results ignored: the machine is "off"
      rw:close()
      if h.info_json(work .. "/top.qcow2", "-U")["dirty-flag"] then
        assert(dirty_ok, label .. ": the overlay was left dirty")
        rw = assert(qcow2.open(work .. "/top.qcow2", { mode = "rw" }))
        rw:close()
      end
      for _, f in ipairs(files) do crash.judge(work .. "/" .. f, label .. ": " .. f) end
      assert(digest(work .. "/top.qcow2") == before, label .. ": the guest disk changed")
    end)
    return writes
  end

  it("a safe rebase", function()
    sweep("rebase", function(img) return img:rebase("new.qcow2", { format = "qcow2" }) end,
          { "top.qcow2" })
  end)

  it("a safe rebase removing the backing file", function()
    sweep("rebase to none", function(img) return img:rebase("") end, { "top.qcow2" })
  end)

  it("a commit (the backing file's writes and the overlay's under one count)", function()
    local writes = sweep("commit", function(img) return img:commit() end,
                         { "top.qcow2", "base.qcow2" }, true)
    -- both files wrote: the count covers the backing file too
    assert.is_true(writes > 8)
  end)
end)
