-- The generic metadata-table cache (csrc/engine/table_cache.c) through its
-- C unit test (csrc/test/table_cache_test.c, a fake disk that logs every
-- read, write-back and barrier): hits and misses, LRU eviction, a dirty
-- table written back before its slot is reused, write-through mode never
-- evicting a dirty table, flush order with a dependency (refcount blocks,
-- a barrier, then the L2 tables), a failed write-back leaving the table
-- dirty, bounded memory, read failures, and mirroring of file writes.
-- Built by make into $BUILD/test (the sanitizer build too: make sanitize).
-- Then the engine's use of it: the write engine marks an L2 table dirty
-- while it changes it and clean once written through, so a 2-table L2
-- cache serves in-place updates of many tables without filling with dirty
-- tables (write-through mode never evicts one).
local h = require("helpers")

local BUILD = os.getenv("BUILD") or "build"
local PROG = BUILD .. "/test/table_cache_test"

local CASES = {
  "hit_and_miss",
  "lru_eviction",
  "dirty_eviction_writes_back_first",
  "write_through_never_evicts_dirty",
  "flush_respects_dependency",
  "failed_write_back_stays_dirty",
  "bounded_memory",
  "read_failures",
  "mirror_write_through",
}

describe("generic table cache (C unit test)", function()
  local out, ok, lines

  setup(function()
    h.must(("make -s BUILD=%s %s"):format(h.q(BUILD), h.q(PROG)))
    ok, out = h.sh(h.q(PROG), true)
    lines = {}
    for line in out:gmatch("[^\n]+") do
      local status, name = line:match("^(n?o?t? ?ok) %d+ %- ([%w_]+)")
      if status then lines[name] = { status = status, line = line } end
    end
  end)

  it("runs every case it plans and exits 0", function()
    assert.matches("^1%.%." .. #CASES .. "\n", out)
    assert.is_true(ok, out)
  end)

  for _, name in ipairs(CASES) do
    it(name, function()
      assert.is_not_nil(lines[name], "case missing from the output:\n" .. out)
      assert.are.equal("ok", lines[name].status, lines[name].line)
    end)
  end
end)

describe("the L2 cache in the write engine", function()
  teardown(h.cleanup)

  it("with 2 tables, in-place updates of 24 L2 tables leave none dirty", function()
    local qcow2 = require("qcow2")
    local CS, SPAN = 512, 512 * 64       -- one L2 table maps 32 KiB
    local dir = h.tmpdir()
    local path = dir .. "/disk.qcow2"
    assert(qcow2.create(path, { size = 24 * SPAN, cluster_size = CS })):close()
    local img <close> = assert(qcow2.open(path, { mode = "rw", l2_cache_size = 2 * CS }))
    for pass = 0, 2 do                   -- new tables, then updates in place
      for t = 0, 23 do
        local ok, msg = img:write(t * SPAN + pass * CS, string.char(65 + pass, t))
        assert.is_true(ok ~= nil, ("pass %d table %d: %s"):format(pass, t, tostring(msg)))
      end
    end
    img:close()
    local clean, _, _, out = require("model").check(path)
    assert.is_true(clean, out)
    local cmds = {}
    for t = 0, 23 do
      for pass = 0, 2 do cmds[#cmds + 1] = ("read -v %d 2"):format(t * SPAN + pass * CS) end
    end
    local got = h.qemu_io(path, cmds)
    for t = 0, 23 do
      for pass = 0, 2 do
        assert.matches(("%08x:  %02x %02x "):format(t * SPAN + pass * CS, 65 + pass, t), got)
      end
    end
  end)
end)
