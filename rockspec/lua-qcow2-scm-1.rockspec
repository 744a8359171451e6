rockspec_format = "3.0"
package = "lua-qcow2"
version = "scm-1"
source = {
   url = "git+file:///dev/null",   -- built from a checkout with `luarocks make`
}
description = {
   summary = "QEMU qcow2 disk images from Lua: a native engine for forensic reading and image testing",
   detailed = [[
A C engine for the qcow2 format (v2/v3, every cluster size and refcount
width, backing chains, zero and compressed clusters, extended L2, internal
snapshots) exposed as Lua userdata. JSON output uses lua-cjson or dkjson
when installed.
]],
   license = "MIT",
}
dependencies = {
   "lua >= 5.4",
}
external_dependencies = {
   ZLIB = { header = "zlib.h" },
   OPENSSL = { header = "openssl/evp.h" },
   ZSTD = { header = "zstd.h" },
}
build = {
   type = "builtin",
   modules = {
      ["qcow2.core"] = {
         sources = {
            -- @SOURCES@ (kept in step with csrc/ by spec/build_spec.lua)
            "csrc/engine/alloc.c",
            "csrc/engine/amend.c",
            "csrc/engine/bitmap.c",
            "csrc/engine/bitmap_extents.c",
            "csrc/engine/bulk_read.c",
            "csrc/engine/check.c",
            "csrc/engine/check_state.c",
            "csrc/engine/check_walk.c",
            "csrc/engine/cluster.c",
            "csrc/engine/compress.c",
            "csrc/engine/compressed_write.c",
            "csrc/engine/create.c",
            "csrc/engine/create_open.c",
            "csrc/engine/damage.c",
            "csrc/engine/diff.c",
            "csrc/engine/error.c",
            "csrc/engine/geometry.c",
            "csrc/engine/handle.c",
            "csrc/engine/header.c",
            "csrc/engine/header_write.c",
            "csrc/engine/image.c",
            "csrc/engine/io.c",
            "csrc/engine/io_fault.c",
            "csrc/engine/l1_grow.c",
            "csrc/engine/l2_cache.c",
            "csrc/engine/lock.c",
            "csrc/engine/map.c",
            "csrc/engine/meta_io.c",
            "csrc/engine/options.c",
            "csrc/engine/overlap.c",
            "csrc/engine/owners.c",
            "csrc/engine/owners_walk.c",
            "csrc/engine/prealloc.c",
            "csrc/engine/properties.c",
            "csrc/engine/read.c",
            "csrc/engine/refcount.c",
            "csrc/engine/refcount_cache.c",
            "csrc/engine/refcount_codec.c",
            "csrc/engine/refcount_scan.c",
            "csrc/engine/repair.c",
            "csrc/engine/residue.c",
            "csrc/engine/resize.c",
            "csrc/engine/snapshot_table.c",
            "csrc/engine/snapshot_view.c",
            "csrc/engine/snapshot_write.c",
            "csrc/engine/switch.c",
            "csrc/engine/table_cache.c",
            "csrc/engine/write.c",
            "csrc/engine/write_state.c",
            "csrc/engine/zero.c",
            "csrc/lua/amend.c",
            "csrc/lua/args.c",
            "csrc/lua/bitmap.c",
            "csrc/lua/check.c",
            "csrc/lua/common.c",
            "csrc/lua/create.c",
            "csrc/lua/diff.c",
            "csrc/lua/forensics.c",
            "csrc/lua/image.c",
            "csrc/lua/map.c",
            "csrc/lua/map_json.c",
            "csrc/lua/module.c",
            "csrc/lua/result.c",
            "csrc/lua/snapshot.c",
            "csrc/lua/snapshot_write.c",
            "csrc/lua/write.c",
         },
         defines = { "_GNU_SOURCE" },
         incdirs = { "csrc", "$(ZLIB_INCDIR)", "$(OPENSSL_INCDIR)", "$(ZSTD_INCDIR)" },
         libdirs = { "$(ZLIB_LIBDIR)", "$(OPENSSL_LIBDIR)", "$(ZSTD_LIBDIR)" },
         libraries = { "z", "crypto", "zstd", "pthread" },
      },
      ["qcow2"] = "lua/qcow2/init.lua",
      ["qcow2.cli"] = "lua/qcow2/cli.lua",
      ["qcow2.edit"] = "lua/qcow2/edit.lua",
      ["qcow2.mutate"] = "lua/qcow2/mutate.lua",
      -- one module per subcommand of the qcow2 tool (spec/cli_spec.lua
      -- checks that every lua/qcow2/cli/*.lua is listed)
      ["qcow2.cli.check"] = "lua/qcow2/cli/check.lua",
      ["qcow2.cli.create"] = "lua/qcow2/cli/create.lua",
      ["qcow2.cli.digest"] = "lua/qcow2/cli/digest.lua",
      ["qcow2.cli.dump"] = "lua/qcow2/cli/dump.lua",
      ["qcow2.cli.export"] = "lua/qcow2/cli/export.lua",
      ["qcow2.cli.info"] = "lua/qcow2/cli/info.lua",
      ["qcow2.cli.map"] = "lua/qcow2/cli/map.lua",
      ["qcow2.cli.read"] = "lua/qcow2/cli/read.lua",
      ["qcow2.cli.snapshot"] = "lua/qcow2/cli/snapshot.lua",
      ["qcow2.cli.util"] = "lua/qcow2/cli/util.lua",
   },
   install = {
      bin = { qcow2 = "lua/qcow2-cli" },
   },
}
