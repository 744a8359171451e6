--- The `qcow2` command-line tool: qemu-img's read side and more, one
-- module per subcommand (lua/qcow2/cli/NAME.lua), this file dispatching.
--
-- A subcommand module returns { summary =, usage =, options =, run = }:
-- `options` is the option spec of qcow2.cli.util.parse (--help and -h are
-- added here), `run(opts, args, ctx)` returns the exit status and writes
-- to ctx.out / ctx.err. Adding a subcommand is one module plus its name
-- in COMMANDS below.
--
-- main(args [, out, err]) returns the exit status (0 ok, 1 failure, 2
-- usage; check has qemu-img check's statuses); the `qcow2` script passes
-- it to os.exit.
local util = require "qcow2.cli.util"

local M = {}

-- In the order --help lists them.
local COMMANDS = {
  "info", "map", "check", "snapshot", "create", "digest", "export",
  "dump", "read", "inspect", "owners", "residue", "diff",
  "convert", "compare", "measure", "rebase", "commit", "resize", "amend",
}

local function load(name)
  for _, n in ipairs(COMMANDS) do
    if n == name then return require("qcow2.cli." .. name) end
  end
  return nil
end

local function usage_text()
  local lines = { "usage: qcow2 COMMAND [OPTIONS] ARGS", "" }
  for _, name in ipairs(COMMANDS) do
    lines[#lines + 1] = ("  %-10s %s"):format(name, load(name).summary)
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "'qcow2 COMMAND --help' describes one command. Images open read-only"
  lines[#lines + 1] = "unless the command writes (snapshot -c/-a/-d, check -r, create,"
  lines[#lines + 1] = "rebase, commit, resize, amend);"
  lines[#lines + 1] = "files without the qcow2 magic open as raw. Encrypted images need"
  lines[#lines + 1] = "--key-file FILE (the passphrase: the file's bytes, one trailing"
  lines[#lines + 1] = "newline dropped)."
  lines[#lines + 1] = "Exit status: 0 ok, 1 failure, 2 usage (check: as qemu-img check)."
  return table.concat(lines, "\n")
end

-- The command's option spec with --help/-h added (not modifying it).
local function spec_of(cmd)
  -- --key-file: the passphrase of an encrypted image, never on the
  -- command line itself (it would show in ps and shell history).
  local spec = { ["--help"] = {}, ["-h"] = { alias = "--help" },
                 ["--key-file"] = { arg = true } }
  for k, v in pairs(cmd.options or {}) do spec[k] = v end
  return spec
end

--- Run the tool with an argument array (arg of the script). Returns the
-- exit status; output goes to out/err (io.stdout/io.stderr by default).
function M.main(args, out, err)
  out, err = out or io.stdout, err or io.stderr
  local list = {}
  for i = 1, #(args or {}) do list[i] = args[i] end
  local name = table.remove(list, 1)
  if name == nil or name == "--help" or name == "-h" or name == "help" then
    ;(name and out or err):write(usage_text(), "\n")
    return name and 0 or 2
  end
  local ctx = { out = out, err = err }
  local ok, status = pcall(function()
    local cmd = load(name)
    if not cmd then util.usage(("unknown command '%s'"):format(name)) end
    -- qemu-img resize's SIZE may be "-1G": taken before option parsing
    local last = cmd.last_arg_raw and #list > 0 and list[#list]:match("^[-+]?%d") and table.remove(list)
    local opts, rest = util.parse(list, spec_of(cmd))
    if last then rest[#rest + 1] = last end
    if opts["--help"] then
      out:write(cmd.usage, "\n")
      return 0
    end
    if opts["--key-file"] then opts.key = util.read_key_file(opts["--key-file"]) end
    return cmd.run(opts, rest, ctx)
  end)
  if ok then return status end
  if getmetatable(status) == util.Failure then
    err:write("qcow2: ", status.msg, "\n")
    return status.status
  end
  err:write("qcow2: ", (tostring(status):gsub("\n.*", "")), "\n")
  return 1
end

return M
