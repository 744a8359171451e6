-- Shared spec helpers: temporary folders, qemu-img/qemu-io wrappers (the
-- oracle), JSON, and byte-level pokes into image files.
local M = {}

local json_ok, cjson = pcall(require, "cjson")
M.json = json_ok and cjson or require("dkjson")

-- Quote a string for /bin/sh.
function M.q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- The interpreter for child Lua processes that load the module: under
-- make sanitize it is `env LD_PRELOAD=<sanitizer runtimes> lua5.4`.
M.LUA = os.getenv("LUA") or "lua5.4"
-- The qcow2 tool from the checkout, run by that interpreter.
M.TOOL = M.LUA .. " lua/qcow2-cli"

-- Run a shell command; returns ok, stdout (stderr merged when merge is true).
-- LD_PRELOAD is dropped: under make sanitize the sanitizer runtimes are
-- preloaded for lua5.4 only, not for every qemu-img the specs start.
function M.sh(cmd, merge)
  local p = assert(io.popen("unset LD_PRELOAD; " .. cmd .. (merge and " 2>&1" or " 2>/dev/null")))
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok == true, out, code
end

-- Run and insist on success; returns stdout.
function M.must(cmd)
  local ok, out, code = M.sh(cmd, true)
  if not ok then error(("command failed (%s): %s\n%s"):format(tostring(code), cmd, out), 2) end
  return out
end

-- A fresh temporary folder, removed by M.cleanup() (call in teardown).
local made = {}
function M.tmpdir()
  local d = M.must("mktemp -d /tmp/lua-qcow2-spec.XXXXXX"):gsub("%s+$", "")
  made[#made + 1] = d
  return d
end
function M.cleanup()
  for _, d in ipairs(made) do os.execute("rm -rf " .. M.q(d)) end
  made = {}
end

-- qemu-img with arguments (a string already quoted by the caller).
function M.qemu_img(args) return M.must("qemu-img " .. args) end
-- qemu-io -c commands on an image: qemu_io(path, {"write -P 0xab 0 64k", ...}, fmt_opts)
function M.qemu_io(path, cmds, extra)
  local parts = { "qemu-io", extra or "-f qcow2" }
  for _, c in ipairs(cmds) do parts[#parts + 1] = "-c " .. M.q(c) end
  parts[#parts + 1] = M.q(path)
  return M.must(table.concat(parts, " "))
end

-- qemu-img create -f qcow2 [-o opts] [-b backing -F fmt] path size
function M.create(path, size, opts, backing, backing_fmt)
  local a = "create -q -f qcow2"
  if opts and opts ~= "" then a = a .. " -o " .. M.q(opts) end
  if backing then a = a .. " -b " .. M.q(backing) .. " -F " .. (backing_fmt or "qcow2") end
  return M.qemu_img(a .. " " .. M.q(path) .. " " .. tostring(size))
end

-- A LUKS image. qemu-img times PBKDF2 to pick iteration counts and fails
-- with "Unable to get accurate CPU usage" when its thread's CPU time reads
-- the same before and after a short run (tick-based accounting on a busy
-- machine; it failed three tries in a row once): try up to 8 times, with a
-- pause and a longer window each time.
-- extra: more -o options ("encrypt.cipher-alg=aes-128,..."), or nil.
function M.create_luks(path, size, secret, extra)
  local out
  for try, iter_ms in ipairs({ 10, 50, 200, 200, 200, 200, 200, 200 }) do
    local ok
    if try > 1 then os.execute("sleep 0.3") end
    ok, out = M.sh(("qemu-img create -q -f qcow2 --object secret,id=s0,data=%s -o "
      .. "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=%d%s %s %s")
      :format(M.q(secret), iter_ms, extra and ("," .. extra) or "", M.q(path), tostring(size)), true)
    if ok then return end
    if not out:find("accurate CPU usage", 1, true) then break end
  end
  error("qemu-img could not create the LUKS image " .. path .. ": " .. out, 2)
end

function M.info_json(path, extra)
  return M.json.decode(M.qemu_img("info --output=json " .. (extra or "") .. " " .. M.q(path)))
end
function M.map_json(path, extra)
  return M.json.decode(M.qemu_img("map --output=json " .. (extra or "") .. " " .. M.q(path)))
end
-- qemu-img check: returns the decoded JSON result and the exit code.
function M.check_json(path)
  local ok, out, code = M.sh("qemu-img check --output=json " .. M.q(path))
  local okj, res = pcall(M.json.decode, out)
  return okj and res or nil, ok and 0 or code, out
end
-- The guest disk as raw bytes through qemu-img (optionally a snapshot).
function M.raw_bytes(path, snapshot)
  local out = path .. ".oracle.raw"
  local snap = snapshot and (" -l " .. M.q("snapshot.name=" .. snapshot)) or ""
  M.qemu_img("convert -O raw" .. snap .. " " .. M.q(path) .. " " .. M.q(out))
  local data = M.read_file(out)
  os.remove(out)
  return data
end

function M.read_file(path)
  local f = assert(io.open(path, "rb"))
  local d = f:read("a")
  f:close()
  return d
end
function M.write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end
function M.copy(src, dst) M.write_file(dst, M.read_file(src)) end

-- Overwrite bytes at a file offset (a "poke").
function M.poke(path, offset, bytes)
  local f = assert(io.open(path, "r+b"))
  f:seek("set", offset)
  f:write(bytes)
  f:close()
end
function M.peek(path, offset, len)
  local f = assert(io.open(path, "rb"))
  f:seek("set", offset)
  local d = f:read(len)
  f:close()
  return d
end
function M.truncate(path, size) M.must("truncate -s " .. size .. " " .. M.q(path)) end

-- Big-endian packing of header-sized integers.
function M.be16(v) return string.pack(">I2", v) end
function M.be32(v) return string.pack(">I4", v) end
function M.be64(v) return string.pack(">I8", v) end
function M.get_be32(path, off) return (string.unpack(">I4", M.peek(path, off, 4))) end
function M.get_be64(path, off) return (string.unpack(">I8", M.peek(path, off, 8))) end

-- Size and mtime (ns) of a file, for read-only proofs.
function M.stat(path)
  local out = M.must("stat -c '%s %Y %y' " .. M.q(path))
  return out
end
function M.sha256_file(path)
  return (M.must("sha256sum " .. M.q(path)):match("^(%x+)"))
end

-- The sha256 hex digest of a string (through a temporary file).
function M.sha256(data)
  local f = os.tmpname()
  M.write_file(f, data)
  local hex = M.sha256_file(f)
  os.remove(f)
  return hex
end

-- Run the `qcow2` tool as a child process: stdout, stderr, exit status.
-- `env` is a prefix such as "QCOW2_PROGRESS_DELAY=0".
function M.run_tool(args, env)
  local errf = os.tmpname()
  local p = assert(io.popen(("unset LD_PRELOAD; %s %s %s 2>%s"):format(env or "", M.TOOL, args, M.q(errf))))
  local out = p:read("a")
  local _, _, code = p:close()
  local err = M.read_file(errf)
  os.remove(errf)
  return out, err, code
end

-- The sha256 of the guest disk as qemu-img reads it (a raw export next to
-- path); fmt, when given, is passed as -f.
function M.export_sha256(path, fmt)
  local raw = path .. ".export.raw"
  M.must("qemu-img convert " .. (fmt and ("-f " .. fmt .. " ") or "") .. "-O raw "
         .. M.q(path) .. " " .. M.q(raw))
  local sha = M.sha256_file(raw)
  os.remove(raw)
  return sha
end

-- Assert that qemu-img check finds neither corruptions nor leaks.
-- (luassert by name: a spec's `assert` global is not this module's)
function M.assert_clean(path)
  local luassert = require("luassert")
  local r = M.check_json(path)
  luassert.equal(0, r.corruptions or 0, path)
  luassert.equal(0, r.leaks or 0, path)
end

-- Append {start, length} to a list of ranges in order, merged into the
-- last one when it ends where this one starts.
function M.add_range(ranges, start, length)
  local last = ranges[#ranges]
  if last and last.start + last.length == start then
    last.length = last.length + length
  else
    ranges[#ranges + 1] = { start = start, length = length }
  end
end

-- Seeded pseudo-random bytes (deterministic, not cryptographic).
function M.random_bytes(n, seed)
  local x = seed or 12345
  local t = {}
  for i = 1, n do
    x = (x * 1103515245 + 12345) % 2147483648
    t[i] = string.char((x >> 16) & 0xff)
  end
  return table.concat(t)
end

-- The library, with the LUA_CPATH the Makefile exports.
-- A raw file of `size` bytes that compresses unevenly: licence text, an
-- incompressible block (QEMU leaves it uncompressed), runs of zeroes.
function M.compressible_file(path, size)
  local text = M.must("cat /usr/share/common-licenses/*")
  local rnd = M.must("head -c 65536 /dev/urandom")
  local f = assert(io.open(path, "wb"))
  local n, i = 0, 0
  while n < size do
    local piece = (i % 5 == 3) and rnd or (i % 7 == 4) and ("\0"):rep(150000) or text
    piece = piece:sub(1, size - n)
    f:write(piece)
    n, i = n + #piece, i + 1
  end
  f:close()
  return path
end

-- qemu-img convert -c of such a file: the image and its source.
function M.compressed_image(dir, name, size, cs, ctype)
  local src = M.compressible_file(dir .. "/" .. name .. ".src", size)
  local p = dir .. "/" .. name .. ".qcow2"
  M.qemu_img(("convert -q -c -f raw -O qcow2 -o compression_type=%s,cluster_size=%d %s %s")
    :format(ctype, cs, M.q(src), M.q(p)))
  return p, src
end

-- A zlib overlay over a zstd-compressed base, holding compressed and
-- plain data, zero clusters, a discard and a partial last cluster: the
-- mixed chain the bulk reader must read as qemu-img does. Returns both.
function M.mixed_compressed_chain(dir)
  local base = M.compressed_image(dir, "base", 6 * 1048576, 65536, "zstd")
  local top = dir .. "/top.qcow2"
  M.create(top, 6 * 1048576, "cluster_size=65536,compression_type=zlib", "base.qcow2")
  M.qemu_io(top, {
    "write -c -P 0x21 0 128k", "write -P 0x33 100k 50k", "write -z 1m 192k",
    "write -c -P 0x44 2m 64k", "discard 2m 64k", "write -c -s /usr/share/common-licenses/GPL-3 4m 64k",
    "write -P 0x55 6029312 1000",
  })
  return top, base
end

function M.qcow2() return require("qcow2") end

return M
