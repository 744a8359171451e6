-- The generic metadata-table cache (csrc/engine/table_cache.c) through its
-- C unit test (csrc/test/table_cache_test.c, a fake disk that logs every
-- read, write-back and barrier): hits and misses, LRU eviction, a dirty
-- table written back before its slot is reused, write-through mode never
-- evicting a dirty table, flush order with a dependency (refcount blocks,
-- a barrier, then the L2 tables), a failed write-back leaving the table
-- dirty, bounded memory, read failures, and mirroring of file writes.
-- Built by make into $BUILD/test (the sanitizer build too: make sanitize).
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
