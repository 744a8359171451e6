-- The build and install paths a user takes: the rockspec stays in step with
-- csrc/, luarocks installs offline into a tree, and the installed module
-- and the qcow2 tool work from there.
local h = require "helpers"

local function rockspec_sources()
  local env = {}
  local chunk = assert(loadfile("rockspec/lua-qcow2-scm-1.rockspec", "t", env))
  chunk()
  return env.build.modules["qcow2.core"].sources, env
end

describe("rockspec", function()
  teardown(h.cleanup)

  it("lists every C source file under csrc/", function()
    local listed = {}
    for _, s in ipairs((rockspec_sources())) do listed[s] = true end
    local on_disk = h.must("ls csrc/engine/*.c csrc/lua/*.c")
    local missing = {}
    for f in on_disk:gmatch("%S+") do
      if not listed[f] then missing[#missing + 1] = f end
      listed[f] = nil
    end
    assert.are.same({}, missing)
    assert.are.same({}, listed)   -- nothing listed that does not exist
  end)

  it("installs offline with luarocks make and the module loads from the tree", function()
    -- builtin builds next to the sources: work on a copy of the checkout
    local tree, src = h.tmpdir(), h.tmpdir()
    h.must(("cp -r csrc lua rockspec %s/"):format(h.q(src)))
    local ok, out = h.sh(("cd %s && luarocks --lua-version=5.4 --tree=%s make rockspec/lua-qcow2-scm-1.rockspec")
      :format(h.q(src), h.q(tree)), true)
    assert.is_true(ok, out)
    -- ";;" keeps the system folders, where Debian's lua-cjson lives
    local lua_path = ("%s/share/lua/5.4/?.lua;%s/share/lua/5.4/?/init.lua;;"):format(tree, tree)
    local lua_cpath = ("%s/lib/lua/5.4/?.so;;"):format(tree)
    local img = h.tmpdir() .. "/x.qcow2"
    h.create(img, "1M")
    local env = ("LUA_PATH=%s LUA_CPATH=%s"):format(h.q(lua_path), h.q(lua_cpath))
    local res = h.must(env .. " lua5.4 -e " .. h.q(
      "local q = require 'qcow2'; local i = assert(q.open('" .. img .. "')); io.write(q.version, ' ', i.size, ' ', package.searchpath('qcow2.core', package.cpath))"))
    assert.matches("^%S+ 1048576 " .. tree:gsub("%p", "%%%0"), res)
    local tool = h.must(env .. " " .. h.q(tree .. "/bin/qcow2") .. " info " .. h.q(img))
    assert.matches("1048576", tool)
    -- the subcommand modules (lua/qcow2/cli/*.lua) come from the tree too
    local map = h.must(env .. " " .. h.q(tree .. "/bin/qcow2") .. " map --output=json " .. h.q(img))
    assert.are.same(h.map_json(img), h.json.decode(map))
    assert.is_true(h.sh("test -f " .. h.q(tree .. "/share/lua/5.4/qcow2/cli/map.lua")))
  end)
end)
