--- qcow2 inspect: one report of an image for an examiner: header and
-- features, backing chain, snapshots, map summary, check verdict, owners
-- and residue summaries, digests of every view. Read-only.
--
-- The module also exports report(img, opts) (the report as a Lua table,
-- the same document --json prints) and text(report, out), for scripts and
-- `make demo`.
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"

local M = {
  summary = "one forensic report: header, chain, snapshots, map, check, owners, residue, digests",
}

local function hexstr(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- img:header() with binary fields as hex strings (printable, and JSON).
local function header_section(img)
  local h = img:header()
  for _, e in ipairs(h.extensions or {}) do
    if e.data then e.data = hexstr(e.data) end
  end
  for _, s in ipairs(h.snapshots or {}) do
    if s.extra_data then s.extra_data = hexstr(s.extra_data) end
  end
  return h
end

local function chain_section(img)
  local chain, layer, depth = {}, img, 0
  while layer do
    chain[#chain + 1] = { depth = depth, path = layer.path,
                          format = layer.version and "qcow2" or "raw",
                          version = layer.version, virtual_size = layer.size,
                          cluster_size = layer.cluster_size,
                          backing_file = layer.backing_file }
    layer, depth = layer:backing(), depth + 1
  end
  return chain
end

local SNAPSHOT_FIELDS = { "id", "name", "date", "date_nsec", "vm_clock",
                          "vm_state_size", "disk_size", "icount",
                          "l1_table_offset", "l1_size" }

local function snapshots_section(img)
  local list = {}
  for _, s in ipairs(img:snapshots()) do
    local t = {}
    for _, k in ipairs(SNAPSHOT_FIELDS) do t[k] = s[k] end
    list[#list + 1] = t
  end
  -- in date order: the timeline an examiner reads (ties: table order)
  local order = {}
  for i, t in ipairs(list) do order[t] = i end
  table.sort(list, function(a, b)
    if a.date ~= b.date then return a.date < b.date end
    if a.date_nsec ~= b.date_nsec then return a.date_nsec < b.date_nsec end
    return order[a] < order[b]
  end)
  return list
end

-- A section whose call may fail on a damaged image: { error = msg } then,
-- so the rest of the report still comes out.
local function try(f, ...)
  local ok, v, msg = pcall(f, ...)
  if not ok then return { error = tostring(v) } end
  if v == nil then return { error = tostring(msg) } end
  return v
end

local function map_section(img)
  local m, msg = img:map()
  if not m then return nil, msg end
  local corrupt = {}
  for e in m:extents() do
    if e.type == "corrupt" then
      corrupt[#corrupt + 1] = { start = e.start, length = e.length, reason = e.reason }
    end
  end
  return { extents = #m, bytes = m:stats(), corrupt = corrupt }
end

local CHECK_FIELDS = { "ok", "corruptions", "leaks", "check_errors",
                       "image_end_offset", "total_clusters", "allocated_clusters",
                       "fragmented_clusters", "compressed_clusters" }

local function check_section(img)
  local r, msg = img:check()
  if not r then return nil, msg end
  local t = { findings = {} }
  for _, k in ipairs(CHECK_FIELDS) do t[k] = r[k] end
  for f in r:findings() do
    t.findings[#t.findings + 1] = { kind = f.kind, offset = f.offset, message = f.message }
  end
  return t
end

-- Counts and bytes per key of a list of ranges.
local function tally(list, key)
  local by = {}
  local total = 0
  for _, r in ipairs(list) do
    local b = by[r[key]] or { count = 0, bytes = 0 }
    b.count, b.bytes = b.count + 1, b.bytes + r.length
    by[r[key]] = b
    total = total + r.length
  end
  return by, total
end

local function owners_section(img)
  local list, msg = img:owners()
  if not list then return nil, msg end
  local by, total = tally(list, "owner")
  return { ranges = #list, bytes = total, by_owner = by }
end

local function residue_section(img)
  local list, msg = img:residue()
  if not list then return nil, msg end
  local by, total = tally(list, "kind")
  local regions = {}
  for i, r in ipairs(list) do
    regions[i] = { offset = r.offset, length = r.length, kind = r.kind, entropy = r.entropy }
  end
  return { count = #list, bytes = total, by_kind = by, regions = regions }
end

-- Digest of each view with on_error = "zero": a damaged view still gets a
-- digest, and the ranges hashed as zeroes are listed with it.
-- progress(done, total) covers all views together.
local function digests_section(img, algo, progress)
  local views = { { label = "active", view = img } }
  local total = img.size
  for _, s in ipairs(img:snapshots()) do
    local v, msg = s:open()
    views[#views + 1] = { label = s.name, id = s.id, view = v, err = msg }
    if v then total = total + v.size end
  end
  local out = { algo = algo, active = nil, snapshots = {} }
  local base = 0
  for _, e in ipairs(views) do
    local d
    if e.view then
      local hook = progress and function(done) progress(base + done, total) end
      local hex, damage = e.view:digest(algo, { on_error = "zero", progress = hook })
      if hex then
        d = { digest = hex, unreadable = damage }
      else
        d = { error = tostring(damage) }
      end
      base = base + e.view.size
      if e.view ~= img then e.view:close() end
    else
      d = { error = tostring(e.err) }
    end
    if e.label == "active" and e.view == img then
      out.active = d
    else
      d.id, d.name = e.id, e.label
      out.snapshots[#out.snapshots + 1] = d
    end
  end
  return out
end

--- The report of an open image as one Lua table. opts.algo (default
-- "sha256"), opts.progress(done, total) for the digests, opts.status(text)
-- returning a function that clears it, for the single long calls.
function M.report(img, opts)
  opts = opts or {}
  local status = opts.status or function() return function() end end
  local info = try(img.info, img)
  local rep = {
    image = { path = img.path, format = "qcow2", version = img.version,
              virtual_size = img.size, cluster_size = img.cluster_size,
              dirty = info["dirty-flag"], backing_file = img.backing_file },
    header = try(header_section, img),
    chain = try(chain_section, img),
    snapshots = try(snapshots_section, img),
  }
  local f = io.open(img.path, "rb")
  if f then rep.image.file_size = f:seek("end") f:close() end
  local clear = status("map ...")
  rep.map = try(map_section, img)
  clear() clear = status("check ...")
  rep.check = try(check_section, img)
  clear() clear = status("owners ...")
  rep.owners = try(owners_section, img)
  clear() clear = status("residue ...")
  rep.residue = try(residue_section, img)
  clear()
  rep.digests = try(digests_section, img, opts.algo or "sha256", opts.progress)
  return rep
end

-- Text ---------------------------------------------------------------------

local function hs(n) return ("%s (%d bytes)"):format(qcow2.human_size(n), n) end

local function names(list)
  if not list or #list == 0 then return "none" end
  return table.concat(list, ", ")
end

-- Keys of t sorted, for stable listings.
local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local function section_error(out, s)
  if s.error then out:write("  unavailable: ", s.error, "\n") return true end
  return false
end

-- A section of counted bytes: its total (sec[count_key] items of
-- sec.bytes, in the summary format), then a line per group of
-- sec[by_key] (count nouns, bytes).
local function print_tally(out, sec, count_key, summary, by_key, noun)
  if section_error(out, sec) then return end
  out:write(summary:format(sec[count_key], hs(sec.bytes)))
  for _, k in ipairs(sorted_keys(sec[by_key])) do
    local b = sec[by_key][k]
    out:write(("  %-18s %6d %s %s\n"):format(k, b.count, noun, hs(b.bytes)))
  end
end

--- The report as text, one section after another, on out.
function M.text(rep, out)
  local im = rep.image
  out:write(("Image: %s\n"):format(im.path))
  out:write(("  qcow2 v%s, virtual size %s, cluster size %d, file size %s%s\n"):format(
    tostring(im.version), hs(im.virtual_size), im.cluster_size or 0,
    im.file_size and hs(im.file_size) or "?", im.dirty and ", dirty" or ""))

  out:write("\nHeader and features:\n")
  local h = rep.header
  if not section_error(out, h) then
    local f = h.features or {}
    out:write(("  incompatible: %s; compatible: %s; autoclear: %s\n"):format(
      names(f.incompatible), names(f.compatible), names(f.autoclear)))
    out:write(("  L1 at 0x%x (%d entries); refcount table at 0x%x (%d clusters, %d-bit refcounts)\n"):format(
      h.l1_table_offset, h.l1_size, h.refcount_table_offset, h.refcount_table_clusters,
      1 << (h.refcount_order or 4)))
    out:write(("  snapshot table at 0x%x (%d entries, %d bytes); header length %d\n"):format(
      h.snapshots_offset, h.nb_snapshots, h.snapshot_table_size or 0, h.header_length or 72))
    for _, e in ipairs(h.extensions or {}) do
      out:write(("  extension 0x%08x%s, %d bytes\n"):format(e.magic,
        e.name and (" (" .. e.name .. ")") or "", e.length))
    end
  end

  out:write("\nBacking chain:\n")
  if not section_error(out, rep.chain) then
    for _, l in ipairs(rep.chain) do
      out:write(("  depth %d  %s  %s%s, %s\n"):format(l.depth, l.path, l.format,
        l.version and (" v" .. l.version) or "", qcow2.human_size(l.virtual_size)))
    end
  end

  out:write("\nSnapshots (in date order):\n")
  if not section_error(out, rep.snapshots) then
    if #rep.snapshots == 0 then out:write("  none\n") end
    for _, s in ipairs(rep.snapshots) do
      out:write(("  %-6s %-20s %s  vm state %s, disk %s\n"):format(s.id, s.name,
        os.date("!%Y-%m-%d %H:%M:%S", s.date), qcow2.human_size(s.vm_state_size),
        qcow2.human_size(s.disk_size or 0)))
    end
  end

  out:write("\nGuest map:\n")
  local m = rep.map
  if not section_error(out, m) then
    local b = m.bytes
    out:write(("  %d extents; data %s, compressed %s, zero %s, unallocated %s, corrupt %s\n"):format(
      m.extents, qcow2.human_size(b.data or 0), qcow2.human_size(b.compressed or 0),
      qcow2.human_size(b.zero or 0), qcow2.human_size(b.unallocated or 0),
      qcow2.human_size(b.corrupt or 0)))
    for _, c in ipairs(m.corrupt) do
      out:write(("  corrupt 0x%x+0x%x: %s\n"):format(c.start, c.length, tostring(c.reason)))
    end
  end

  local c = rep.check
  if section_error(out, c) then
    out:write("\nConsistency check: unavailable\n")
  else
    out:write(("\nConsistency check: %s (%d corruptions, %d leaks, %d errors; %d/%d clusters allocated, %d compressed, %d fragmented)\n"):format(
      c.ok and "clean" or "PROBLEMS", c.corruptions, c.leaks, c.check_errors,
      c.allocated_clusters, c.total_clusters, c.compressed_clusters, c.fragmented_clusters))
    for _, f in ipairs(c.findings) do
      if f.kind ~= "strict" then out:write("  ", f.message, "\n") end
    end
  end

  out:write("\nOwners of the file's bytes:\n")
  print_tally(out, rep.owners, "ranges", "  %d ranges covering %s\n", "by_owner", "ranges")

  out:write("\nResidue (bytes no view reads):\n")
  print_tally(out, rep.residue, "count", "  %d regions, %s\n", "by_kind", "regions")

  local d = rep.digests
  out:write(("\nDigests (%s):\n"):format(d.algo or "?"))
  if not section_error(out, d) then
    local function line(label, e)
      if e.error then
        out:write(("  %-24s unavailable: %s\n"):format(label, e.error))
        return
      end
      out:write(("  %-24s %s\n"):format(label, e.digest))
      for _, u in ipairs(e.unreadable or {}) do
        out:write(("    unreadable 0x%x+0x%x (hashed as zeroes): %s\n"):format(
          u.start, u.length, tostring(u.reason)))
      end
    end
    line("active", d.active)
    for _, s in ipairs(d.snapshots) do
      line(("snapshot %s (%s)"):format(s.id, s.name), s)
    end
  end
end

M.usage = [[
usage: qcow2 inspect [--json] [--algo ALGO] [-U] IMG

One report of IMG: header and features, backing chain, snapshots (in
date order), a summary of the guest map, the consistency check's
verdict, who owns the file's bytes, the residue no view reads, and the
digest (default sha256) of the active disk and of each snapshot. Parts
that a damaged image cannot give say why; the rest still comes out
(damaged guest ranges are hashed as zeroes and listed). --json prints
the whole report as one JSON document with the sections image, header,
chain, snapshots, map, check, owners, residue and digests. IMG is opened
read-only; -U opens an image a running VM holds.]]

M.options = {
  ["--json"] = {}, ["--output"] = { arg = true, choices = { "human", "json" } },
  ["--algo"] = { arg = true }, ["-a"] = { arg = true, alias = "--algo" },
  ["-U"] = {}, ["--force-share"] = { alias = "-U" },
}

function M.run(opts, args, ctx)
  if #args ~= 1 then util.usage("inspect takes one image") end
  local img <close> = util.open(args[1], { force_share = opts["-U"] or nil,
                                           allow_raw = false })
  local update, finish
  local rep = M.report(img, {
    algo = opts["--algo"],
    status = function(what) return util.status(ctx, args[1] .. ": " .. what) end,
    progress = function(done, total)
      if not update then update, finish = util.progress(ctx, "digests " .. args[1], total) end
      update(done)
    end,
  })
  if finish then finish() end
  if util.output_format(opts) == "json" then
    ctx.out:write(util.json(rep), "\n")
  else
    M.text(rep, ctx.out)
  end
  return 0
end

return M
