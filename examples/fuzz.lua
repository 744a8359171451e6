#!/usr/bin/env lua5.4
--[[ A fuzz campaign: seeded structure-aware mutations of qcow2 images,
checked by the library and by qemu-img.

  lua5.4 examples/fuzz.lua [--count N] [--seconds S] [--seed S] [--per-case K]
                           [--batch B] [--oracle N] [--work DIR] [--only ID] [--keep]

1. Builds seed images with qemu-img and with the library: v2 and v3, cluster
   sizes 512 B to 64 KiB, refcount widths 1 to 64 bits, zlib and zstd
   compression, extended L2, snapshots, a backing chain and a bitmap.
2. Case i copies seed image i % #seeds and applies 1..K mutations
   (qcow2.mutate, seed derived from --seed and i).
3. A child lua5.4 process (so that a crash or an abort shows as its exit
   status, a hang as `timeout` killing it) takes a batch of cases: open,
   read every byte (capped), map, check, info, snapshots and their views;
   then repairs a copy (check{repair = "all"}) and checks it again.
4. For every --oracle'th case, qemu-img check/info on the mutated image,
   qemu-img check -r all on a copy, and qemu-img check on the library's
   repaired copy.
5. Records crashes, hangs, Lua errors raised on image input, errors
   without a code (or with a message that is not one line), repairs that
   leave corruption, and verdict disagreements with qemu-img (classified),
   each with the case id and its seed. Rerun one case with --seed S --only ID.

Stops after --count cases or --seconds seconds (whichever first), prints a
summary table and a last line "SUMMARY key=value ..." for scripts.
]]

local script_dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = script_dir .. "/../lua/?.lua;" .. script_dir .. "/../lua/?/init.lua;" .. package.path
-- The checkout's build when the module is not on LUA_CPATH already (make
-- test and make sanitize point LUA_CPATH at their own build folder).
if not package.searchpath("qcow2.core", package.cpath) then
  package.cpath = script_dir .. "/../build/?.so;" .. package.cpath
end

local qcow2 = require "qcow2"

local LUA = arg[-1] or "lua5.4"
-- Children load the same module as this process: under make sanitize that
-- is an ASan build, which needs the runtimes this process was started with
-- (qemu-img and other tools still run without them).
local PRELOAD = os.getenv("LD_PRELOAD")
local CHILD_LUA = (PRELOAD and PRELOAD ~= "") and ("env LD_PRELOAD='" .. PRELOAD:gsub("'", "'\\''") .. "' " .. LUA) or LUA
local READ_CAP = 8 * 1024 * 1024
local CHUNK = 1024 * 1024
local CODES = {
  io = true, nospace = true, notfound = true, exists = true, invalid = true, corrupt = true,
  unsupported = true, readonly = true, key = true, nomem = true, busy = true,
}

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function read_file(p)
  local f = assert(io.open(p, "rb"))
  local d = f:read("a")
  f:close()
  return d
end
local function write_file(p, d)
  local f = assert(io.open(p, "wb"))
  f:write(d)
  f:close()
end

-- Run a shell command: output (stderr merged), exit code (128+n: signal n).
local function sh(cmd)
  local p = assert(io.popen("unset LD_PRELOAD; " .. cmd .. " 2>&1"))
  local out = p:read("a")
  local _, how, code = p:close()
  if how == "signal" then code = 128 + code end
  return out, code
end
local function must(cmd)
  local out, code = sh(cmd)
  if code ~= 0 then error(("command failed (%d): %s\n%s"):format(code, cmd, out), 2) end
  return out
end

-- ===========================================================================
-- Child: the library side of a batch of cases

-- One finding line: kind, detail on one line.
local function emit(...) io.stdout:write(table.concat({ ... }, "\t"), "\n") end

-- A failed call must give a one-line message and a code of the API's set.
local function fail_ok(msg, code)
  return type(msg) == "string" and #msg > 0 and not msg:find("[\r\n]")
    and type(code) == "string" and CODES[code] ~= nil
end

local function exercise(id, path, uncoded)
  local function call(what, ok, msg, code)
    if ok == nil and not fail_ok(msg, code) then
      uncoded[#uncoded + 1] = ("%s: msg %q code %s"):format(what, tostring(msg), tostring(code))
    end
    return ok, msg, code
  end
  local function read_all(img, what)
    local size = img.size
    local spans = {}
    if size <= READ_CAP then
      for off = 0, size - 1, CHUNK do spans[#spans + 1] = { off, math.min(CHUNK, size - off) } end
    else
      spans = { { 0, CHUNK }, { size - CHUNK, CHUNK } }
    end
    for _, s in ipairs(spans) do call(what .. " read", img:read(s[1], s[2])) end
    local m = call(what .. " map", img:map())
    if m then local _ = #m end
  end
  local img, msg, code = call("open", qcow2.open(path))
  if not img then return "refused:" .. tostring(code), msg end
  local verdict = "clean"
  local ok, err = pcall(function()
    read_all(img, "image")
    call("info", img:info())
    local r, cmsg, ccode = call("check", img:check())
    if not r then
      verdict = "errors"
      msg = cmsg .. " (" .. tostring(ccode) .. ")"
    elseif r.corruptions > 0 then verdict = "corrupt"
    elseif r.check_errors > 0 then verdict = "errors"
    elseif r.leaks > 0 then verdict = "leaks" end
    local snaps = call("snapshots", img:snapshots())
    for i = 1, math.min(#(snaps or {}), 3) do
      local _ = tostring(snaps[i])
      local view = call("snapshot view", snaps[i]:open())
      if view then
        local vok, verr = pcall(read_all, view, "snapshot " .. i)
        view:close()
        if not vok then error(verr, 0) end
      end
    end
  end)
  img:close()
  if not ok then error(err, 0) end
  return verdict, msg
end

-- Repair a copy with the library, then check it again.
local function repair(path, uncoded)
  local copy = path .. ".lrep"
  write_file(copy, read_file(path))
  local img, msg, code = qcow2.open(copy, { mode = "rw", repair = true })
  if not img then
    if not fail_ok(msg, code) then uncoded[#uncoded + 1] = ("repair open: msg %q code %s"):format(tostring(msg), tostring(code)) end
    return "unopened"
  end
  local r, rmsg, rcode = img:check({ repair = "all" })
  if not r and not fail_ok(rmsg, rcode) then
    uncoded[#uncoded + 1] = ("repair: msg %q code %s"):format(tostring(rmsg), tostring(rcode))
  end
  local cok, cmsg, ccode = img:close()
  if cok == nil and not fail_ok(cmsg, ccode) then
    uncoded[#uncoded + 1] = ("repair close: msg %q code %s"):format(tostring(cmsg), tostring(ccode))
  end
  if not r then return "failed" end
  local again = qcow2.open(copy)
  if not again then return "unopenable" end
  local r2 = again:check()
  again:close()
  if not r2 then return "uncheckable" end
  if r2.corruptions > 0 or r2.leaks > 0 or r2.check_errors > 0 then
    return ("left corruptions=%d leaks=%d errors=%d"):format(r2.corruptions, r2.leaks, r2.check_errors)
  end
  return "clean"
end

-- QCOW2_FUZZ_SELFTEST="crash:ID" or "uncoded:ID" makes the child fail on
-- purpose at case ID: proof that the runner notices (spec/campaign_spec.lua).
local SELFTEST_KIND, SELFTEST_ID = (os.getenv("QCOW2_FUZZ_SELFTEST") or ""):match("^(%a+):(%d+)$")

local function child(manifest)
  io.stdout:setvbuf("line")
  for line in io.lines(manifest) do
    local id, path = line:match("^(%d+)\t(.*)$")
    emit("BEGIN", id)
    if id == SELFTEST_ID and SELFTEST_KIND == "crash" then os.exit(134) end
    local uncoded = {}
    local ok, verdict, detail = pcall(exercise, id, path, uncoded)
    if not ok then
      emit("FIND", id, "raised", (tostring(verdict):gsub("%s+", " ")))
      verdict = "raised"
    end
    local rok, rep = pcall(repair, path, uncoded)
    if not rok then
      emit("FIND", id, "raised", "repair: " .. (tostring(rep):gsub("%s+", " ")))
      rep = "raised"
    end
    if id == SELFTEST_ID and SELFTEST_KIND == "uncoded" then uncoded[#uncoded + 1] = "selftest: msg nil code nil" end
    for _, u in ipairs(uncoded) do emit("FIND", id, "uncoded", (u:gsub("%s+", " "))) end
    emit("END", id, verdict, rep, (tostring(detail or ""):gsub("%s+", " ")))
  end
end

if arg[1] == "--child" then
  child(arg[2])
  os.exit(0)
end

-- ===========================================================================
-- Parent

local opts = { count = 200, seconds = nil, seed = 1, per_case = 3, batch = 50, oracle = 10 }
do
  local i = 1
  while i <= #arg do
    local a, v = arg[i], arg[i + 1]
    local num = tonumber(v)
    if a == "--count" then opts.count = assert(math.tointeger(num), "--count N"); i = i + 1
    elseif a == "--seconds" then opts.seconds = assert(num, "--seconds S"); i = i + 1
    elseif a == "--seed" then opts.seed = assert(math.tointeger(num), "--seed S"); i = i + 1
    elseif a == "--per-case" then opts.per_case = assert(math.tointeger(num), "--per-case K"); i = i + 1
    elseif a == "--batch" then opts.batch = assert(math.tointeger(num), "--batch B"); i = i + 1
    elseif a == "--oracle" then opts.oracle = assert(math.tointeger(num), "--oracle N (0: never)"); i = i + 1
    elseif a == "--work" then opts.work = v; i = i + 1
    elseif a == "--only" then opts.only = assert(math.tointeger(num), "--only ID"); i = i + 1
    elseif a == "--keep" then opts.keep = true
    elseif a == "--quiet" then opts.quiet = true
    else
      io.stderr:write("usage: fuzz.lua [--count N] [--seconds S] [--seed S] [--per-case K] "
        .. "[--batch B] [--oracle N] [--work DIR] [--only ID] [--keep] [--quiet]\n")
      os.exit(2)
    end
    i = i + 1
  end
end

local function log(...) if not opts.quiet then print(...) end end

local work = opts.work or must("mktemp -d /tmp/qcow2-fuzz.XXXXXX"):gsub("%s+$", "")
must("mkdir -p " .. q(work .. "/seeds") .. " " .. q(work .. "/cases"))

-- Seed images ----------------------------------------------------------------

local function qimg(args) return must("qemu-img " .. args) end
local function qio(path, cmds)
  local parts = { "qemu-io -f qcow2" }
  for _, c in ipairs(cmds) do parts[#parts + 1] = "-c " .. q(c) end
  parts[#parts + 1] = q(path)
  return must(table.concat(parts, " "))
end
local function create(path, size, o, backing)
  qimg(("create -q -f qcow2 %s %s %s %s"):format(o and ("-o " .. q(o)) or "",
    backing and ("-b " .. q(backing) .. " -F qcow2") or "", q(path), size))
end

local SEEDS = {
  { name = "v3_64k", build = function(p)
      create(p, "4M")
      qio(p, { "write -P 0x11 0 128k", "write -c -P 0x22 1M 64k", "write -z 2M 64k" })
      qimg("snapshot -c s1 " .. q(p))
      qio(p, { "write -P 0x33 64k 64k" })
    end },
  { name = "v2_64k", build = function(p)
      create(p, "2M", "compat=0.10")
      qio(p, { "write -P 0x11 0 64k", "write -c -P 0x22 128k 64k" })
      qimg("snapshot -c s1 " .. q(p))
      qio(p, { "write -P 0x44 64k 64k" })
    end },
  { name = "c4k_rc1", build = function(p)
      create(p, "2M", "cluster_size=4096,refcount_bits=1")
      qio(p, { "write -P 0x11 0 16k", "write -c -P 0x22 64k 4k", "write -P 0x33 1M 4k" })
    end },
  { name = "c512_rc64", build = function(p)
      create(p, "256K", "cluster_size=512,refcount_bits=64")
      qio(p, { "write -P 0x11 0 2k", "write -c -P 0x22 40k 512", "write -P 0x33 200k 1k" })
      qimg("snapshot -c a " .. q(p))
      qio(p, { "write -P 0x44 512 512" })
    end },
  { name = "c16k_rc8_lazy", build = function(p)
      create(p, "2M", "cluster_size=16384,refcount_bits=8,lazy_refcounts=on")
      qio(p, { "write -P 0x11 0 32k", "write -c -P 0x22 64k 16k", "write -z 512k 16k" })
      qimg("snapshot -c s1 " .. q(p))
    end },
  { name = "extl2_32k", build = function(p)
      create(p, "2M", "extended_l2=on,cluster_size=32768")
      qio(p, { "write -P 0x11 0 32k", "write -P 0x22 40k 2k", "write -c -P 0x33 64k 32k",
               "write -z 128k 4k" })
      qimg("snapshot -c s1 " .. q(p))
      qio(p, { "write -P 0x55 44k 2k" })
    end },
  { name = "zstd_64k", build = function(p)
      create(p, "2M", "compression_type=zstd")
      qio(p, { "write -c -P 0x11 0 64k", "write -c -P 0x22 64k 64k", "write -P 0x33 1M 64k" })
    end },
  { name = "chain_4k", base = "chain-base.qcow2", build = function(p, dir)
      local b = dir .. "/chain-base.qcow2"
      create(b, "2M")
      qio(b, { "write -P 0x11 0 128k", "write -P 0x22 1M 4k" })
      create(p, "2M", "cluster_size=4096", "chain-base.qcow2")
      qio(p, { "write -P 0x33 64k 4k", "write -z 1M 4k" })
    end },
  { name = "bitmap_64k", build = function(p)
      create(p, "2M")
      qimg("bitmap --add -f qcow2 " .. q(p) .. " bm0")
      qio(p, { "write -P 0x11 0 64k", "write -P 0x22 1M 4k" })
    end },
  { name = "lib_v3_8k_rc4", build = function(p)
      local img = assert(qcow2.create(p, { size = 2 * 1024 * 1024, cluster_size = 8192, refcount_bits = 4 }))
      assert(img:write(0, ("\x11"):rep(24576)))
      assert(img:write_compressed(65536, ("\x22"):rep(8192)))
      assert(img:create_snapshot("s1"))
      assert(img:write(8192, ("\x33"):rep(8192)))
      assert(img:close())
    end },
  { name = "lib_v2_64k", build = function(p)
      local img = assert(qcow2.create(p, { size = 1024 * 1024, version = 2 }))
      assert(img:write(0, ("\x44"):rep(65536 + 512)))
      assert(img:create_snapshot("s1"))
      assert(img:write(65536, ("\x55"):rep(4096)))
      assert(img:close())
    end },
}

local seeds = {}
for _, s in ipairs(SEEDS) do
  local dir = work .. "/seeds"
  local p = dir .. "/" .. s.name .. ".qcow2"
  s.build(p, dir)
  seeds[#seeds + 1] = { name = s.name, bytes = read_file(p) }
  if s.base then
    must("cp " .. q(dir .. "/" .. s.base) .. " " .. q(work .. "/cases/" .. s.base))
  end
end

-- Cases ----------------------------------------------------------------------

-- A 64-bit mix, for per-case seeds that differ in every bit.
local function mix(x)
  x = (x ~ (x >> 30)) * 0xBF58476D1CE4E5B9
  x = (x ~ (x >> 27)) * 0x94D049BB133111EB
  return x ~ (x >> 31)
end

local function make_case(id)
  local s = seeds[id % #seeds + 1]
  local cseed = mix(opts.seed * 1000003 + id)
  local n = 1 + ((cseed >> 1) % opts.per_case)
  local path = ("%s/cases/case-%d.qcow2"):format(work, id)
  write_file(path, s.bytes)
  local muts, msg = qcow2.mutate(path, { seed = cseed, count = n })
  return { id = id, seed = cseed, image = s.name, path = path, mutations = muts or {}, mutate_error = msg }
end

local function describe(c)
  local parts = {}
  for _, m in ipairs(c.mutations) do
    local function show(v)
      if math.type(v) == "integer" then return ("0x%x"):format(v) end
      v = tostring(v)
      return #v > 24 and ("%q"):format(v:sub(1, 24)) .. "..." or ("%q"):format(v)
    end
    parts[#parts + 1] = ("%s %s %s->%s"):format(m.target, m.where, show(m.old), show(m.new))
  end
  return table.concat(parts, "; ")
end

-- qemu-img ----------------------------------------------------------------

local function qemu_verdict(path)
  local out, code = sh("timeout -s KILL 20 qemu-img check " .. q(path))
  if code == 0 then return "clean", out end
  if code == 2 then return "corrupt", out end
  if code == 3 then return "leaks", out end
  if code == 63 then return "refused", out end
  if code == 1 then
    if out:find("Could not open", 1, true) or out:find("not supported", 1, true) then
      return "refused", out
    end
    return "errors", out
  end
  return "crashed:" .. code, out
end

-- Classify a library verdict against qemu-img's (nil: they agree).
local function norm(v)
  if v:match("^refused") then return "refused" end
  if v == "errors" then return "corrupt" end
  return v
end
local CLASSES = {
  ["clean/corrupt"] = "lib_misses_corruption", ["leaks/corrupt"] = "lib_misses_corruption",
  ["clean/leaks"] = "lib_misses_leaks",
  ["clean/refused"] = "lib_opens_qemu_refuses", ["leaks/refused"] = "lib_opens_qemu_refuses",
  ["corrupt/refused"] = "lib_opens_qemu_refuses",
  ["leaks/clean"] = "lib_extra_leaks",
  ["corrupt/clean"] = "lib_extra_corruption", ["corrupt/leaks"] = "lib_extra_corruption",
  ["refused/clean"] = "lib_refuses_qemu_clean",
  ["refused/leaks"] = "lib_refuses_qemu_opens", ["refused/corrupt"] = "lib_refuses_qemu_opens",
}
local function classify(lib, qemu)
  local a, b = norm(lib), norm(qemu)
  if a == b then return nil end
  return CLASSES[a .. "/" .. b] or ("other_" .. a .. "_" .. b)
end

-- Run ------------------------------------------------------------------------

local summary = {
  cases = 0, mutations = 0, crash = 0, hang = 0, raised = 0, uncoded = 0,
  repair_left_corruption = 0, repair_unrepairable = 0, disagreements = 0, oracle_cases = 0,
  lib_clean = 0, lib_leaks = 0, lib_corrupt = 0, lib_refused = 0,
}
local findings = {}
local classes = {}

local function find(c, kind, detail)
  if summary[kind] then summary[kind] = summary[kind] + 1 end
  findings[#findings + 1] = ("case %d [%s, mutate seed %d]: %s: %s\n    mutations: %s\n    rerun: %s --seed %d --only %d")
    :format(c.id, c.image, c.seed, kind, detail, describe(c), arg[0], opts.seed, c.id)
end

-- Run the library side of `cases` in child processes; a child that dies
-- names the case it was in (its last BEGIN without END).
local function run_children(cases, by_id)
  local todo = cases
  while #todo > 0 do
    local manifest = work .. "/manifest.txt"
    local lines = {}
    for i, c in ipairs(todo) do lines[i] = c.id .. "\t" .. c.path end
    write_file(manifest, table.concat(lines, "\n") .. "\n")
    local budget = 20 + 2 * #todo
    local p = assert(io.popen(("unset LD_PRELOAD; timeout -s KILL %d %s %s --child %s 2>&1")
      :format(budget, CHILD_LUA, q(arg[0]), q(manifest))))
    local current, done, tail = nil, {}, {}
    for line in p:lines() do
      local f = {}
      for field in (line .. "\t"):gmatch("(.-)\t") do f[#f + 1] = field end
      if f[1] == "BEGIN" then
        current = tonumber(f[2])
      elseif f[1] == "FIND" then
        find(by_id[tonumber(f[2])], f[3], f[4] or "")
      elseif f[1] == "END" then
        local c = by_id[tonumber(f[2])]
        c.verdict, c.repair, c.detail = f[3], f[4], f[5]
        done[c.id] = true
        current = nil
      else
        tail[#tail + 1] = line
        if #tail > 20 then table.remove(tail, 1) end
      end
    end
    local _, how, code = p:close()
    if how == "signal" then code = 128 + code end
    local rest = {}
    if current then
      local c = by_id[current]
      if code == 124 or code == 137 then
        find(c, "hang", ("killed after %d s"):format(budget))
      else
        find(c, "crash", ("child exit %s; last output: %s"):format(tostring(code),
          table.concat(tail, " | "):sub(-600)))
      end
      done[current] = true
    elseif code ~= 0 then
      io.stderr:write(("fuzz: child exited %s between cases: %s\n"):format(tostring(code), table.concat(tail, " | ")))
    end
    for _, c in ipairs(todo) do
      if not done[c.id] and current then rest[#rest + 1] = c end
    end
    todo = rest
  end
end

local function oracle(c)
  summary.oracle_cases = summary.oracle_cases + 1
  local qv = qemu_verdict(c.path)
  c.qemu = qv
  if qv:match("^crashed") then
    findings[#findings + 1] = ("case %d: qemu-img check %s (not a library finding)"):format(c.id, qv)
  end
  local _, icode = sh("timeout -s KILL 20 qemu-img info " .. q(c.path))
  c.qemu_info = icode
  if c.verdict and c.verdict ~= "raised" then
    local cls = classify(c.verdict, qv)
    if cls then
      summary.disagreements = summary.disagreements + 1
      classes[cls] = (classes[cls] or 0) + 1
      findings[#findings + 1] = ("case %d [%s, mutate seed %d]: disagreement %s: library %s (%s), qemu-img %s\n    mutations: %s")
        :format(c.id, c.image, c.seed, cls, c.verdict, c.detail or "", qv, describe(c))
    end
  end
  -- the library's repair, judged by qemu-img
  if c.repair == "clean" then
    local rv = qemu_verdict(c.path .. ".lrep")
    if rv == "corrupt" or rv == "errors" then
      find(c, "repair_left_corruption", "qemu-img check after the library's repair: " .. rv)
    end
  end
  -- qemu-img's own repair, for the record
  local qrep = c.path .. ".qrep"
  write_file(qrep, read_file(c.path))
  sh("timeout -s KILL 20 qemu-img check -r all " .. q(qrep))
  c.qemu_repair = qemu_verdict(qrep)
end

-- The library's repair left corruption (its own re-check): a finding when
-- qemu-img's repair of the same image comes out clean; otherwise neither
-- repairs it (e.g. a broken snapshot table, which check -r does not touch).
local function judge_repair(c)
  if not (c.repair and c.repair:match("^left")) then return end
  if not c.qemu_repair then
    local qrep = c.path .. ".qrep"
    write_file(qrep, read_file(c.path))
    sh("timeout -s KILL 20 qemu-img check -r all " .. q(qrep))
    c.qemu_repair = qemu_verdict(qrep)
  end
  -- qemu-img 7.2 rewriting the header at open (a stale bitmaps extension,
  -- an unknown autoclear bit) before the snapshot table is read loses
  -- every snapshot: a clean result bought so is not one to match
  local function nb_snapshots(p)
    local f = assert(io.open(p, "rb"))
    local head = f:read(64) or ""
    f:close()
    return #head == 64 and string.unpack(">I4", head, 61) or 0
  end
  local lost = nb_snapshots(c.path) > 0 and nb_snapshots(c.path .. ".qrep") == 0
  if c.qemu_repair == "clean" and not lost then
    find(c, "repair_left_corruption", "library re-check after its repair: " .. c.repair
      .. "; qemu-img's repair of the same image is clean")
  else
    summary.repair_unrepairable = summary.repair_unrepairable + 1
  end
end

local t0 = os.time()
local next_id = opts.only or 0
local last_id = opts.only or (opts.count - 1)
while next_id <= last_id do
  if opts.seconds and os.time() - t0 >= opts.seconds then break end
  local batch, by_id = {}, {}
  while #batch < opts.batch and next_id <= last_id do
    local c = make_case(next_id)
    if c.mutate_error then
      findings[#findings + 1] = ("case %d: mutate failed: %s"):format(c.id, c.mutate_error)
    end
    batch[#batch + 1] = c
    by_id[c.id] = c
    summary.cases = summary.cases + 1
    summary.mutations = summary.mutations + #c.mutations
    next_id = next_id + 1
  end
  run_children(batch, by_id)
  for _, c in ipairs(batch) do
    local v = c.verdict or "none"
    if v:match("^refused") then summary.lib_refused = summary.lib_refused + 1
    elseif summary["lib_" .. v] then summary["lib_" .. v] = summary["lib_" .. v] + 1 end
    if opts.only or (opts.oracle > 0 and c.id % opts.oracle == 0) then oracle(c) end
    judge_repair(c)
    if opts.only then
      log(("case %d: %s\n  library: %s (%s), repair: %s\n  qemu-img check: %s, repaired by qemu-img: %s")
        :format(c.id, describe(c), tostring(c.verdict), tostring(c.detail), tostring(c.repair),
                tostring(c.qemu), tostring(c.qemu_repair)))
    end
    if not opts.keep then
      os.remove(c.path); os.remove(c.path .. ".lrep"); os.remove(c.path .. ".qrep")
    end
  end
end
summary.seconds = os.time() - t0

-- Report ----------------------------------------------------------------------

for _, f in ipairs(findings) do log(f) end
local rows = {
  { "cases", summary.cases }, { "mutations", summary.mutations },
  { "library: clean", summary.lib_clean }, { "library: leaks", summary.lib_leaks },
  { "library: corrupt", summary.lib_corrupt }, { "library: refused", summary.lib_refused },
  { "crashes", summary.crash }, { "hangs", summary.hang },
  { "Lua errors raised", summary.raised }, { "errors without a code", summary.uncoded },
  { "repairs leaving corruption", summary.repair_left_corruption },
  { "  unrepaired by qemu-img too", summary.repair_unrepairable },
  { "qemu-img sampled cases", summary.oracle_cases },
  { "verdict disagreements", summary.disagreements },
}
local names = {}
for k in pairs(classes) do names[#names + 1] = k end
table.sort(names)
for _, k in ipairs(names) do rows[#rows + 1] = { "  " .. k, classes[k] } end
rows[#rows + 1] = { "seconds", summary.seconds }
print(("%-32s %10s"):format("fuzz campaign (seed " .. opts.seed .. ")", "count"))
for _, r in ipairs(rows) do print(("%-32s %10d"):format(r[1], r[2])) end
if opts.keep or opts.work then print("work folder kept: " .. work) else os.execute("rm -rf " .. q(work)) end

local kv = {}
local keys = {}
for k in pairs(summary) do keys[#keys + 1] = k end
table.sort(keys)
for _, k in ipairs(keys) do kv[#kv + 1] = k .. "=" .. tostring(summary[k]) end
for _, k in ipairs(names) do kv[#kv + 1] = "class." .. k .. "=" .. classes[k] end
print("SUMMARY " .. table.concat(kv, " "))
local bad = summary.crash + summary.hang + summary.raised + summary.uncoded
os.exit(bad == 0 and 0 or 1)
