-- luacheck configuration (make test runs luacheck over lua/, spec/ and
-- examples/). Real problems only: undefined or accidental globals, unused
-- variables and values, shadowing, unreachable code. Line length and unused
-- function arguments (callbacks keep their full signatures) are style, not
-- bugs, and are left to review.
std = "lua54"
max_line_length = false
unused_args = false
-- The build's cache folders (luarocks trees, TAP output) are not sources.
exclude_files = { "build/**", "build-*/**" }

files["spec/"] = { std = "+busted" }
-- `;(a or b):write(...)`: the leading semicolon is deliberate (it keeps the
-- call from joining the previous statement).
files["lua/qcow2/cli.lua"] = { ignore = { "551" } }
