-- make bench: the library and QEMU's tools on the workloads of issue 14,
-- side by side, in the same run. Never part of make test.
--
-- Each workload is built fresh here (seeded data, 64 KiB clusters unless
-- stated). Each side runs as its own process under /usr/bin/time (peak
-- RSS) and is timed by the shell (milliseconds); the library's side is
-- bench/child.lua. Every timing is the median of 3 runs after one warm-up
-- run (page cache warm for both sides). A line:
--   name  ours  theirs  ratio  ours_rss  theirs_rss
-- ratio = theirs / ours (above 1: the library is faster), RSS in MiB.
--
-- BENCH_SCALE (default 1) scales the data sizes and counts (0.1 for a
-- quick run); BENCH_DIR picks the scratch folder (default /tmp);
-- BENCH_ONLY="4,5" runs only those workloads; BENCH_MATCH="rebase,commit"
-- only the rows whose names hold one of those words.
local SCALE = tonumber(os.getenv("BENCH_SCALE") or "1")
local ONLY = os.getenv("BENCH_ONLY")
local function want(n) return not ONLY or (("," .. ONLY .. ","):find("," .. n .. ",", 1, true)) ~= nil end
local LUA = os.getenv("LUA") or "lua5.4"
local KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  if not p:close() then error("command failed: " .. cmd .. "\n" .. out) end
  return out
end

local function scaled(n, align)
  local v = math.max(align, math.floor(n * SCALE / align) * align)
  return math.tointeger(v)
end

local dir = sh("mktemp -d " .. (os.getenv("BENCH_DIR") or "/tmp") .. "/lua-qcow2-bench.XXXXXX"):gsub("%s+$", "")
local function path(name) return dir .. "/" .. name end

-- One timed process: seconds (wall) and peak RSS (KiB).
local function measure(cmd)
  local rss = path("rss")
  local out = sh(("bash -c %s"):format(q(("TIMEFORMAT=%%3R; time (/usr/bin/time -f %%M -o %s sh -c %s > /dev/null)")
    :format(q(rss), q(cmd)))))
  local secs = tonumber(out:match("([%d.]+)%s*$"))
  local f = assert(io.open(rss))
  local kib = tonumber(f:read("a"):match("(%d+)%s*$"))
  f:close()
  return secs, kib
end

-- Median of 3 (after a warm-up run); prep runs untimed before each run.
local function median3(cmd, prep)
  if prep then sh(prep) end
  measure(cmd)
  local t, r = {}, {}
  for i = 1, 3 do
    if prep then sh(prep) end
    t[i], r[i] = measure(cmd)
  end
  table.sort(t)
  table.sort(r)
  return t[2], r[2]
end

local child = ("%s bench/child.lua"):format(LUA)
local function ours(...)
  local parts = { child }
  for _, v in ipairs({ ... }) do parts[#parts + 1] = q(v) end
  return table.concat(parts, " ")
end

local rows = {}
local function row(name, o_t, t_t, o_r, t_r, extra)
  local line = ("%-46s %8.3f %8.3f %7.2f %8.1f %8.1f%s"):format(name, o_t, t_t, t_t / o_t,
    o_r / 1024, t_r / 1024, extra and ("  " .. extra) or "")
  rows[#rows + 1] = line
  print(line)
  io.stdout:flush()
end
local MATCH = os.getenv("BENCH_MATCH")
local function compare(name, our_cmd, their_cmd, prep_ours, prep_theirs, extra)
  if MATCH then
    local hit = false
    for word in MATCH:gmatch("[^,]+") do hit = hit or name:find(word, 1, true) ~= nil end
    if not hit then return end
  end
  local ot, orss = median3(our_cmd, prep_ours)
  local tt, trss = median3(their_cmd, prep_theirs)
  row(name, ot, tt, orss, trss, type(extra) == "function" and extra(ot, tt) or extra)
end

-- Seeded pseudo-random bytes (AES-CTR of zeroes), as a raw file.
local function seeded(file, bytes, seed)
  sh(("openssl enc -aes-128-ctr -nosalt -pass pass:%s -pbkdf2 < /dev/zero 2>/dev/null | head -c %d > %s")
    :format(seed, bytes, q(file)))
end
-- Seeded offsets list: n distinct slots of `slot` bytes in [0, span),
-- written one per line.
local function offsets_file(file, n, span, slot, seed)
  local slots, seen, list, x = span // slot, {}, {}, seed
  while #list < n do
    x = (x * 6364136223846793005 + 1442695040888963407) & 0x7fffffffffffffff
    local s = (x >> 20) % slots
    if not seen[s] then seen[s] = true; list[#list + 1] = s * slot end
  end
  local f = assert(io.open(file, "w"))
  for _, o in ipairs(list) do f:write(o, "\n") end
  f:close()
  return list
end
local function qemu_script(file, list, fmt)
  local f = assert(io.open(file, "w"))
  for _, o in ipairs(list) do f:write(fmt:format(o), "\n") end
  f:close()
end

print(("lua-qcow2 bench (BENCH_SCALE=%s) in %s"):format(SCALE, dir))

-- Machine limits -----------------------------------------------------------
local SEQ = scaled(2 * GiB, 64 * MiB)
local raw = path("seq.raw")
seeded(raw, SEQ, "bench-seq")
sh("cat " .. q(raw) .. " > /dev/null")
local dd = sh(("dd if=%s of=/dev/null bs=4M 2>&1"):format(q(raw)))
print("page-cache read bandwidth (dd bs=4M): " .. (dd:match("s, ([%d.,]+ %a+/s)") or dd))
local speed = sh("openssl speed -seconds 1 sha256 2>/dev/null")
local sha = speed:match("\nsha256%s+[%d.]+k%s+[%d.]+k%s+[%d.]+k%s+[%d.]+k%s+([%d.]+)k")
local SHA_MBS = (tonumber(sha) or 0) / 1000
print(("openssl sha256 (8192-byte blocks): %.0f MB/s"):format(SHA_MBS))
print(("%-46s %8s %8s %7s %8s %8s"):format("workload", "ours", "theirs", "ratio", "ours_MiB", "their_MiB"))

-- 1: sequential read of a fully allocated image ----------------------------
local seq = path("seq.qcow2")
if want(1) or want(7) or want(8) or want(9) then
  sh(("qemu-img convert -f raw -O qcow2 %s %s"):format(q(raw), q(seq)))
end
if want(1) then compare(("1 sequential read %d MiB (4 MiB calls)"):format(SEQ // MiB),
  ours("seqread", seq),
  -- qemu-io reads at most 2 GiB - 512 bytes per command: 1 GiB pieces
  (function()
    local cmds = {}
    for off = 0, SEQ - 1, GiB do
      cmds[#cmds + 1] = "-c " .. q(("read %d %d"):format(off, math.min(GiB, SEQ - off)))
    end
    return ("qemu-io -r -f qcow2 %s %s"):format(table.concat(cmds, " "), q(seq))
  end)())
end

-- 2: digest of a compressed image ----------------------------------------------
-- The issue's row is zlib (qemu-img's default compression); the zstd row
-- shows the same pipeline when the decoder is not the limit.
local CSIZE = scaled(1 * GiB, 64 * MiB)
-- compressible (about 3:4, as text): base64 of seeded bytes, made once;
-- the images (one per compression type) are kept for workload 9
local craw, comp = path("comp.raw"), {}
local function compressed(ctype)
  if not comp[ctype] then
    if not io.open(craw) then
      sh(("openssl enc -aes-128-ctr -nosalt -pass pass:bench-comp -pbkdf2 < /dev/zero 2>/dev/null | base64 -w 76 | head -c %d > %s")
        :format(CSIZE, q(craw)))
    end
    comp[ctype] = path("comp-" .. ctype .. ".qcow2")
    sh(("qemu-img convert -c -f raw -O qcow2 -o compression_type=%s %s %s"):format(ctype, q(craw), q(comp[ctype])))
  end
  return comp[ctype]
end
if want(2) then
local export = path("export.raw")
local function share(ot)
  local mbs = CSIZE / 1e6 / ot
  return ("ours %.0f MB/s of guest data, %.0f%% of sha256"):format(mbs, SHA_MBS > 0 and 100 * mbs / SHA_MBS or 0)
end
for _, ctype in ipairs({ "zlib", "zstd" }) do
  compare(("2 digest sha256, %d MiB %s-compressed"):format(CSIZE // MiB, ctype),
    ours("digest", compressed(ctype)),
    ("qemu-img convert -f qcow2 -O raw %s %s && sha256sum %s && rm -f %s"):format(q(comp[ctype]), q(export), q(export), q(export)),
    nil, nil, share)
end
end

-- 3: random allocating writes ---------------------------------------------------
local NW = scaled(20000, 1)
if want(3) then
local wlist = offsets_file(path("w.off"), NW, 16 * GiB, 64 * KiB, 12345)
qemu_script(path("w.qemu"), wlist, "write -P 0x5a %d 4k")
local wimg = path("w.qcow2")
for _, lazy in ipairs({ false, true }) do
  local o = lazy and " -o lazy_refcounts=on" or ""
  local prep = ("rm -f %s && qemu-img create -q -f qcow2%s %s 16G"):format(q(wimg), o, q(wimg))
  local tag = lazy and ", lazy refcounts" or ""
  -- the same cache mode on both sides; lazy refcounts set in the header
  compare(("3 %d rand 4K writes, writeback%s"):format(NW, tag),
    ours("writes", wimg, path("w.off"), "writeback", lazy and "lazy" or "eager"),
    ("qemu-io -t writeback -f qcow2 %s < %s"):format(q(wimg), q(path("w.qemu"))), prep, prep)
  compare(("3 %d rand 4K writes, writethrough%s"):format(NW, tag),
    ours("writes", wimg, path("w.off"), "writethrough", lazy and "lazy" or "eager"),
    ("qemu-io -f qcow2 %s < %s"):format(q(wimg), q(path("w.qemu"))), prep, prep)
end
os.remove(wimg)
end

-- 4, 5: check and map of a big sparse image with scattered clusters ----------------
local NC = scaled(100000, 1)
if want(4) or want(5) then
local big = path("scatter.qcow2")
-- 4 KiB written into each of NC scattered 64 KiB clusters
local clist = offsets_file(path("c.off"), NC, 100 * GiB, 64 * KiB, 777)
qemu_script(path("c.qemu"), clist, "write -P 0x11 %d 4k")
sh(("qemu-img create -q -f qcow2 %s 100G && qemu-io -t unsafe -f qcow2 %s < %s > /dev/null")
  :format(q(big), q(big), q(path("c.qemu"))))
local function preads(cmd)
  local out = sh(("strace -f -c -e trace=pread64 -o %s sh -c %s > /dev/null; cat %s")
    :format(q(path("strace")), q(cmd), q(path("strace"))))
  for line in out:gmatch("[^\n]+") do
    local f = {}
    for w in line:gmatch("%S+") do f[#f + 1] = w end
    if f[#f] == "pread64" then return tonumber(f[4]) end
  end
  return 0
end
local our_check = ours("check", big)
local their_check = ("qemu-img check %s"):format(q(big))
if want(4) then
  compare(("4 check, 100 GiB with %d 4K writes"):format(NC), our_check, their_check, nil, nil,
    ("preads %d vs %d"):format(preads(our_check), preads(their_check)))
end
if want(5) then
  compare("5 map():to_json(), same image", ours("map", big), ("qemu-img map --output=json %s"):format(q(big)))
end
os.remove(big)
end

-- 6: create 1 TiB with metadata preallocation --------------------------------------
local TB = scaled(1024 * GiB, GiB)
if want(6) then
local cimg = path("prealloc.qcow2")
compare(("6 create %d GiB preallocation=metadata"):format(TB // GiB),
  ours("create", cimg, TB),
  ("qemu-img create -q -f qcow2 -o preallocation=metadata %s %d"):format(q(cimg), TB),
  "rm -f " .. q(cimg), "rm -f " .. q(cimg))
os.remove(cimg)
end

-- 7: snapshot create + delete on the sequential image ---------------------------------
if want(7) then compare("7 snapshot create + delete",
  ours("snapshot", seq),
  ("qemu-img snapshot -c bench %s && qemu-img snapshot -d bench %s"):format(q(seq), q(seq))) end

-- 8: random 4 KiB reads of allocated data -------------------------------------------------
local NR = scaled(100000, 1)
if want(8) then
local rlist = offsets_file(path("r.off"), NR, SEQ, 4 * KiB, 4242)
qemu_script(path("r.qemu"), rlist, "read %d 4k")
compare(("8 %d random 4K reads"):format(NR),
  ours("randread", seq, path("r.off")),
  ("qemu-io -r -f qcow2 %s < %s"):format(q(seq), q(path("r.qemu"))))
end

-- 9: lifecycle: convert to raw, convert compressed, compare (the
-- sequential image against a copy with other clusters, so every byte is
-- compared); ours through the qcow2 tool, as a script would call it
if want(9) then
local cout, copy = path("conv.out"), path("copy.qcow2")
local tool = LUA .. " lua/qcow2-cli"
compare("9 convert qcow2 -> raw",
  ("%s convert -O raw %s %s"):format(tool, q(seq), q(cout)),
  ("qemu-img convert -O raw %s %s"):format(q(seq), q(cout)),
  "rm -f " .. q(cout), "rm -f " .. q(cout))
compare("9 convert -> qcow2 compressed",
  ("%s convert -c -O qcow2 %s %s"):format(tool, q(seq), q(cout)),
  ("qemu-img convert -c -O qcow2 %s %s"):format(q(seq), q(cout)),
  "rm -f " .. q(cout), "rm -f " .. q(cout))
compare(("9 convert %d MiB zlib-compressed -> raw"):format(CSIZE // MiB),
  ("%s convert -O raw %s %s"):format(tool, q(compressed("zlib")), q(cout)),
  ("qemu-img convert -O raw %s %s"):format(q(compressed("zlib")), q(cout)),
  "rm -f " .. q(cout), "rm -f " .. q(cout))
sh(("qemu-img convert -O qcow2 -o cluster_size=4096 %s %s"):format(q(seq), q(copy)))
compare("9 compare (vs a 4K-cluster copy)",
  ("%s compare %s %s"):format(tool, q(seq), q(copy)),
  ("qemu-img compare %s %s"):format(q(seq), q(copy)))
os.remove(cout)
os.remove(copy)

-- safe rebase: an overlay of the sequential image (scattered 4 KiB
-- writes) onto a copy of that image with other data in some 1 MiB ranges;
-- both sides start from a fresh copy of the overlay. qemu-img rebase's
-- cache mode is its default, writeback; ours is opened with that mode.
local ov_t, ov, newb = path("ov.tmpl"), path("ov.qcow2"), path("newb.qcow2")
local NOV = scaled(1000, 1)
sh(("cp %s %s"):format(q(seq), q(newb)))
local nlist = offsets_file(path("n.off"), scaled(64, 1), SEQ, MiB, 99)
qemu_script(path("n.qemu"), nlist, "write -P 0x77 %d 1M")
sh(("qemu-io -t unsafe -f qcow2 %s < %s > /dev/null"):format(q(newb), q(path("n.qemu"))))
local olist = offsets_file(path("o.off"), NOV, SEQ, 64 * KiB, 31)
qemu_script(path("o.qemu"), olist, "write -P 0x66 %d 4k")
sh(("qemu-img create -q -f qcow2 -b %s -F qcow2 %s && qemu-io -t unsafe -f qcow2 %s < %s > /dev/null")
  :format(q(seq), q(ov), q(ov), q(path("o.qemu"))))
sh(("mv %s %s"):format(q(ov), q(ov_t)))
local ov_prep = ("cp %s %s && sync %s"):format(q(ov_t), q(ov), q(ov))
compare(("9 rebase -b (safe), %d MiB, %d ranges differ"):format(SEQ // MiB, #nlist),
  ours("rebase", ov, newb),
  ("qemu-img rebase -q -f qcow2 -b %s -F qcow2 %s"):format(q(newb), q(ov)), ov_prep, ov_prep)
-- the same overlay over an intermediate image holding those 1 MiB
-- ranges, rebased onto the sequential image below it (dropping the
-- intermediate, the usual reason to rebase): the two chains share
-- everything but the intermediate's data
local mid = path("mid.qcow2")
sh(("qemu-img create -q -f qcow2 -b %s -F qcow2 %s && qemu-io -t unsafe -f qcow2 %s < %s > /dev/null")
  :format(q(seq), q(mid), q(mid), q(path("n.qemu"))))
sh(("qemu-img create -q -f qcow2 -b %s -F qcow2 %s && qemu-io -t unsafe -f qcow2 %s < %s > /dev/null")
  :format(q(mid), q(ov), q(ov), q(path("o.qemu"))))
sh(("mv %s %s"):format(q(ov), q(ov_t)))
compare("9 rebase -b (safe) onto the backing's backing",
  ours("rebase", ov, seq),
  ("qemu-img rebase -q -f qcow2 -b %s -F qcow2 %s"):format(q(seq), q(ov)), ov_prep, ov_prep)
os.remove(ov)
os.remove(ov_t)
os.remove(mid)
os.remove(newb)

-- commit: an overlay with scattered 4 KiB writes (one 64 KiB cluster each)
-- into a qcow2 backing file holding data in its first eighth; both sides
-- start from fresh copies of both files. qemu-img commit: writeback.
local CB = scaled(4 * GiB, 64 * MiB)
local cbase, ctop = path("cbase.qcow2"), path("ctop.qcow2")
local NCOM = scaled(5000, 1)
sh(("qemu-img create -q -f qcow2 %s %d && qemu-io -t unsafe -f qcow2 -c %s %s > /dev/null")
  :format(q(cbase), CB, q(("write -P 0x33 0 %d"):format(CB // 8)), q(cbase)))
local tlist = offsets_file(path("t.off"), NCOM, CB, 64 * KiB, 57)
qemu_script(path("t.qemu"), tlist, "write -P 0x44 %d 4k")
sh(("qemu-img create -q -f qcow2 -b %s -F qcow2 %s && qemu-io -t unsafe -f qcow2 %s < %s > /dev/null")
  :format(q(cbase), q(ctop), q(ctop), q(path("t.qemu"))))
sh(("cp --sparse=always %s %s.tmpl && cp %s %s.tmpl"):format(q(cbase), q(cbase), q(ctop), q(ctop)))
local c_prep = ("cp --sparse=always %s.tmpl %s && cp %s.tmpl %s && sync %s %s")
  :format(q(cbase), q(cbase), q(ctop), q(ctop), q(cbase), q(ctop))
compare(("9 commit, %d scattered clusters"):format(NCOM),
  ours("commit", ctop),
  ("qemu-img commit -q -f qcow2 %s"):format(q(ctop)), c_prep, c_prep)

-- measure: from the commit's overlay (its chain: the base's data and the
-- scattered clusters), and for plain create options. One measure is a few
-- milliseconds, mostly process start-up: each side runs 20 times in a
-- loop, a process per run, so that the timer's noise does not decide.
sh(c_prep)
local function times20(cmd) return ("for i in $(seq 20); do %s; done"):format(cmd) end
compare("9 measure --output=json, from an image, 20 runs",
  times20(ours("measure_from", ctop)),
  times20(("qemu-img measure --output=json -O qcow2 %s"):format(q(ctop))))
compare("9 measure --output=json, --size 1T, 20 runs",
  times20(ours("measure_size", 1024 * GiB)),
  times20(("qemu-img measure --output=json -O qcow2 --size %d"):format(1024 * GiB)))
sh(("rm -f %s %s %s.tmpl %s.tmpl"):format(q(cbase), q(ctop), q(cbase), q(ctop)))
end

sh("rm -rf " .. q(dir))
