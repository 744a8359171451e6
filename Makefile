# lua-qcow2: build the engine + binding as build/qcow2/core.so and run the
# busted suite under Lua 5.4. Targets: all test demo doc sanitize valgrind
# fuzz (fuzz-build) sweep bench install clean deps nobarrier layer-check test-progs.

LUA_VERSION ?= 5.4
LUA         ?= lua$(LUA_VERSION)
PKGS        := lua$(LUA_VERSION) zlib libcrypto libzstd
CC          ?= cc
# pkg-config is asked when a recipe first needs the flags, not when the
# Makefile is parsed: on a new machine `make deps demo` installs pkg-config
# and the headers first (deferred variables that cache their first value).
PKG_CFLAGS   = $(eval PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null))$(PKG_CFLAGS)
PKG_LIBS     = $(eval PKG_LIBS := $(shell pkg-config --libs zlib libcrypto libzstd 2>/dev/null))$(PKG_LIBS)

CFLAGS      ?= -O2 -g
WARN        := -std=c11 -Wall -Wextra -Werror -Wshadow -Wvla
ALL_CFLAGS   = $(WARN) -D_GNU_SOURCE -fPIC $(PKG_CFLAGS) $(CFLAGS)
LDFLAGS     ?=

BUILD       ?= build
ENGINE_SRC  := $(sort $(wildcard csrc/engine/*.c))
BINDING_SRC := $(sort $(wildcard csrc/lua/*.c))
SRC         := $(ENGINE_SRC) $(BINDING_SRC)
OBJ         := $(patsubst csrc/%.c,$(BUILD)/obj/%.o,$(SRC))
HEADERS     := csrc/qcow2.h $(wildcard csrc/engine/*.h) $(wildcard csrc/lua/*.h)
MODULE      := $(BUILD)/qcow2/core.so
# C unit tests of engine parts (spec/*_spec.lua run them); never installed.
TEST_PROGS  := $(BUILD)/test/table_cache_test $(BUILD)/test/open_memory_test \
               $(BUILD)/test/bulk_read_test
ENGINE_OBJ  := $(patsubst csrc/%.c,$(BUILD)/obj/%.o,$(ENGINE_SRC))

export LUA_PATH  := ./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;
export LUA_CPATH := ./$(BUILD)/?.so;;

.PHONY: all test demo doc sanitize tsan valgrind fuzz sweep bench install clean deps nobarrier layer-check test-progs

all: $(MODULE)

$(BUILD)/obj/%.o: csrc/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

# With `make deps <target>` (and -j), nothing compiles before deps is done.
ifneq ($(filter deps,$(MAKECMDGOALS)),)
$(OBJ): | deps
endif

# The source list as a file that changes only when the list does, so that
# removing or adding a source file relinks the module.
SRC_STAMP   := $(BUILD)/sources.list
$(shell mkdir -p $(BUILD) && echo '$(SRC)' | cmp -s - $(SRC_STAMP) || echo '$(SRC)' > $(SRC_STAMP))

$(MODULE): $(OBJ) $(SRC_STAMP)
	@mkdir -p $(dir $@)
	$(CC) -shared $(LDFLAGS) -o $@ $(OBJ) $(PKG_LIBS) $(EXTRA_LIBS)

test-progs: $(TEST_PROGS)

$(BUILD)/test/table_cache_test: csrc/test/table_cache_test.c $(BUILD)/obj/engine/table_cache.o $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/obj/engine/table_cache.o

$(BUILD)/test/open_memory_test: csrc/test/open_memory_test.c $(filter $(BUILD)/obj/engine/%,$(OBJ)) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $< $(filter $(BUILD)/obj/engine/%,$(OBJ)) $(PKG_LIBS) $(EXTRA_LIBS)

$(BUILD)/test/bulk_read_test: csrc/test/bulk_read_test.c $(ENGINE_OBJ) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $< $(ENGINE_OBJ) $(PKG_LIBS) -lpthread

# The bulk reader's worker threads under ThreadSanitizer: its C test
# program built with -fsanitize=thread, driven by spec/digest_spec.lua.
tsan:
	$(MAKE) BUILD=build-tsan CFLAGS="-O1 -g -fsanitize=thread" LDFLAGS="-fsanitize=thread" build-tsan/test/bulk_read_test
	@$(MAKE) -s all
	@TSAN_OPTIONS=halt_on_error=1 BULK_READ_TEST=build-tsan/test/bulk_read_test BUILD=$(BUILD) LUA=$(LUA) sh spec/run-specs spec/digest_spec.lua

# Every spec file under Lua 5.4; ends with "N passed, N failed". The layer
# check runs first and is strict: any upward call, include of a higher
# layer's header, binding use of a non-public symbol, stale exception or
# unlisted file fails the run (LAYER_CHECK=--report only prints them).
LAYER_CHECK ?= --strict
test: $(MODULE) $(TEST_PROGS)
	@$(LUA) csrc/layer-check $(LAYER_CHECK) --summary --obj $(BUILD)/obj
	@command -v luacheck >/dev/null || { echo "luacheck not found (make deps: lua-check)"; exit 1; }
	@luacheck -q --formatter plain lua spec examples
	@BUILD=$(BUILD) LUA=$(LUA) sh spec/run-specs $(SPECS)

# The engine's layers (csrc/README.md): calls only downwards, the binding
# only through csrc/qcow2.h. Prints every violation, cycle and the files a
# read-only consumer links.
layer-check: $(MODULE)
	@$(LUA) csrc/layer-check $(LAYER_CHECK) --obj $(BUILD)/obj

# The sample image's library report, then `qcow2 inspect` of it (the
# demo script runs the tool's inspect module on the image it made).
demo: $(MODULE)
	@$(LUA) examples/demo.lua

# The reference of the whole Lua API (config.ld; the C binding is
# documented in doc/qcow2.luadoc) as HTML in $(BUILD)/doc.
doc:
	@rm -rf $(BUILD)/doc
	@ldoc --fatalwarnings --dir $(BUILD)/doc --date '' . >/dev/null
	@echo "reference written to $(BUILD)/doc/index.html"

# The whole suite with ASan + UBSan; lua5.4 itself is not instrumented,
# so the runtime is preloaded.
sanitize:
	$(MAKE) BUILD=build-san CFLAGS="-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
	        LDFLAGS="-fsanitize=address,undefined" all test-progs
	@ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	BUILD=build-san LUA_CPATH="./build-san/?.so;;" LUA="env LD_PRELOAD=$$($(CC) -print-file-name=libasan.so):$$($(CC) -print-file-name=libubsan.so) $(LUA)" \
	sh spec/run-specs $(SPECS)

valgrind: $(MODULE)
	@BUILD=$(BUILD) LUA="valgrind -q --error-exitcode=99 --leak-check=no $(LUA)" sh spec/run-specs $(SPECS)

# make fuzz: the Lua fuzz specs, then every libFuzzer harness (csrc/fuzz/)
# for FUZZ_SECONDS each on its corpus (seeded from qemu-img images); with
# -j the harnesses run side by side. Logs, corpora and any crashing input
# (crash-<harness>-*) stay in build/fuzz/. `make fuzz-build` only builds.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 600
FUZZ_MAX_LEN ?= 1048576
FUZZ_DIR     := $(BUILD)/fuzz
FUZZ_NAMES   := open read map check repair snapshot write
FUZZ_BINS    := $(addprefix $(FUZZ_DIR)/fuzz_,$(FUZZ_NAMES))
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_CFLAGS   = -std=c11 -Wall -Wextra -D_GNU_SOURCE -g -O1 $(FUZZ_SAN) $(PKG_CFLAGS)
FUZZ_OBJ     := $(patsubst csrc/%.c,$(FUZZ_DIR)/obj/%.o,$(ENGINE_SRC))
# -timeout: one input's wall-clock seconds; a hang is caught, a busy shared
# machine is not (check of a 1 MiB image can walk ~10^8 L2 entries, as
# qemu-img does, a few seconds under ASan).
FUZZ_TIMEOUT ?= 30
FUZZ_FLAGS    = -dict=csrc/fuzz/qcow2.dict -max_len=$(FUZZ_MAX_LEN) -rss_limit_mb=2048 -timeout=$(FUZZ_TIMEOUT) -print_final_stats=1

.PHONY: fuzz-build fuzz-lua fuzz-corpus $(addprefix fuzz-run-,$(FUZZ_NAMES))

fuzz: fuzz-lua $(addprefix fuzz-run-,$(FUZZ_NAMES))

fuzz-lua: $(MODULE)
	@QCOW2_FUZZ_ITERATIONS=$${QCOW2_FUZZ_ITERATIONS:-2000} BUILD=$(BUILD) LUA=$(LUA) sh spec/run-specs spec/fuzz_spec.lua spec/repair_fuzz_spec.lua

fuzz-build: $(FUZZ_BINS) $(FUZZ_DIR)/seeds/.done

.SECONDARY: $(FUZZ_OBJ)

$(FUZZ_DIR)/obj/%.o: csrc/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_DIR)/fuzz_%: csrc/fuzz/fuzz_%.c csrc/fuzz/fuzz_common.h $(FUZZ_OBJ) $(HEADERS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_OBJ) $(PKG_LIBS)

# Seeds (shared, read-only to the runs): regenerated when the builder
# changes; each harness grows its own corpus folder, corpus/<harness>.
$(FUZZ_DIR)/seeds/.done: csrc/fuzz/make-corpus.lua $(MODULE)
	@rm -rf $(FUZZ_DIR)/seeds
	@FUZZ_MAX_LEN=$(FUZZ_MAX_LEN) $(LUA) csrc/fuzz/make-corpus.lua $(FUZZ_DIR)/seeds
	@touch $@
fuzz-corpus: $(FUZZ_DIR)/seeds/.done

$(addprefix fuzz-run-,$(FUZZ_NAMES)): fuzz-run-%: $(FUZZ_DIR)/fuzz_% $(FUZZ_DIR)/seeds/.done
	@echo "fuzz_$*: $(FUZZ_SECONDS) s (log: $(FUZZ_DIR)/fuzz_$*.log)"
	@mkdir -p $(FUZZ_DIR)/corpus/$*
	@$(FUZZ_DIR)/fuzz_$* $(FUZZ_FLAGS) -max_total_time=$(FUZZ_SECONDS) \
	   -artifact_prefix=$(FUZZ_DIR)/crash-$*- $(FUZZ_DIR)/corpus/$* $(FUZZ_DIR)/seeds \
	   > $(FUZZ_DIR)/fuzz_$*.log 2>&1; \
	 rc=$$?; grep -E '^(stat::|Done|#[0-9]+ *DONE)' $(FUZZ_DIR)/fuzz_$*.log | sed 's/^/  fuzz_$*: /'; \
	 [ $$rc -eq 0 ] || { tail -n 40 $(FUZZ_DIR)/fuzz_$*.log; exit $$rc; }

sweep: $(MODULE)
	@QCOW2_SWEEP=full BUILD=$(BUILD) LUA=$(LUA) sh spec/run-specs $(SPECS)

# Test-only variant with the engine's write barriers compiled out, in its
# own folder: spec/barrier_spec.lua shows the power-cut sweep catches it.
# Never installed; the normal build never sees the define.
nobarrier:
	@$(MAKE) -s BUILD=build-nobarrier CFLAGS="-O1 -DQCOW2_TEST_NO_BARRIER" all

# Issue 14's workloads against qemu-img/qemu-io (BENCH_SCALE=0.1 for a
# quick run); needs time, strace and openssl (make deps).
bench: $(MODULE)
	@LUA=$(LUA) $(LUA) bench/run.lua

# Install into the Lua module folders (as luarocks would).
PREFIX      ?= /usr/local
LUA_LIBDIR  ?= $(PREFIX)/lib/lua/$(LUA_VERSION)
LUA_SHAREDIR?= $(PREFIX)/share/lua/$(LUA_VERSION)
install: $(MODULE)
	install -d $(DESTDIR)$(LUA_LIBDIR)/qcow2 $(DESTDIR)$(LUA_SHAREDIR)/qcow2/cli $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(MODULE) $(DESTDIR)$(LUA_LIBDIR)/qcow2/core.so
	install -m 0644 lua/qcow2/*.lua $(DESTDIR)$(LUA_SHAREDIR)/qcow2/
	install -m 0644 lua/qcow2/cli/*.lua $(DESTDIR)$(LUA_SHAREDIR)/qcow2/cli/
	install -m 0755 lua/qcow2-cli $(DESTDIR)$(PREFIX)/bin/qcow2

clean:
	rm -rf build build-san build-nobarrier build-tsan

# The Debian packages the build, the tests and the oracle need.
DEB_PKGS := lua5.4 liblua5.4-dev lua-busted lua-cjson lua-dkjson zlib1g-dev libssl-dev \
            libzstd-dev pkg-config qemu-utils luarocks gcc make lua-ldoc cryptsetup-bin \
            clang libclang-rt-14-dev lua-check time strace openssl
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	else echo "deps: all present"; fi
