# sdk/c/plugin.mk — build a Synod command handler written in C.
#
# A plugin's Makefile names the plugin and its sources and includes this:
#
#     PLUGIN := counter-c
#     SRCS   := counter.c
#     include ../../sdk/c/plugin.mk
#
# Then:
#
#     make            $(PLUGIN).wasm, the component to upload
#     make core       $(BUILD)/core.wasm, the core module inside it
#     make inspect    load the component as the host does (needs `synod`)
#     make clean
#
# Steps: clang compiles the sources, the SDK (synod.c, wasi_stubs.c) and the
# generated bindings (gen/) for wasm32 against wasi-libc; wasm-ld links
# them, with gen/command_handler_component_type.o, whose custom section
# carries the `command-handler` world, into a reactor core module with no
# WASI import left (wasi_stubs.c answers what stdio asks);
# a check stops the build if any import outside synod:plugin remains (a
# clock, entropy or file call: the host would refuse the component);
# `wasm-tools component new` wraps the module into a component, the same
# step the host's `synod plugin build` takes for Rust plugins
# (wit-component's ComponentEncoder, with validation).
#
# Needs (Debian 12): apt-get install clang-19 lld-19 wasi-libc
# libclang-rt-19-dev-wasm32, and wasm-tools, pinned to the wit-component
# release the host uses:
#     cargo install wasm-tools --version 1.254.2 --locked \
#         --no-default-features --features component,print
# No wit-bindgen: the bindings in gen/ are committed (sdk/c/gen.sh).
#
# Determinism: see synod.h. Nothing here adds a clock or entropy; the
# stack is placed first in linear memory so that a stack overflow is an
# out-of-bounds trap (the same on every node), not silent corruption.

SYNOD_C_SDK := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))

ifndef PLUGIN
$(error set PLUGIN (the component's file name) before including plugin.mk)
endif
ifndef SRCS
$(error set SRCS (the plugin's C sources) before including plugin.mk)
endif

ifeq ($(origin CC),default)
CC := clang-19
endif
WASM_TOOLS ?= wasm-tools
SYNOD ?= synod
# Debian 12's wasi-libc installs under the wasm32-wasi triple; a newer
# sysroot (wasi-sdk, Debian 13) may want wasm32-wasip1.
WASI_TARGET ?= wasm32-wasi
BUILD ?= build
# The shadow stack in linear memory (Rust plugins get 1 MiB too).
STACK_SIZE ?= 1048576

# CFLAGS is the user's; a plugin's Makefile adds its own in PLUGIN_CFLAGS.
CFLAGS ?= -O2 -Wall -Wextra
SYNOD_CFLAGS := --target=$(WASI_TARGET) -I$(SYNOD_C_SDK) -MMD -MP
# A reactor: wasi-libc's crt1-reactor.o exports `_initialize`, which runs
# the C constructors once; wit-component turns it into the component's
# start, so it runs once per instance, before any call. (Without start
# files wasm-ld would link a "command" instead: every export, cabi_realloc
# included, wrapped to run the constructors before it and the destructors,
# stdio teardown and atexit handlers, after it.)
SYNOD_LDFLAGS := --target=$(WASI_TARGET) -mexec-model=reactor \
	-Wl,--stack-first -Wl,-z,stack-size=$(STACK_SIZE) -Wl,--strip-debug

SYNOD_C_TYPE := $(SYNOD_C_SDK)/gen/command_handler_component_type.o
SYNOD_C_HDRS := $(SYNOD_C_SDK)/synod.h $(SYNOD_C_SDK)/gen/command_handler.h

PLUGIN_OBJS := $(patsubst %.c,$(BUILD)/%.o,$(SRCS))
SYNOD_C_OBJS := $(BUILD)/sdk/synod.o $(BUILD)/sdk/wasi_stubs.o $(BUILD)/sdk/command_handler.o

.DEFAULT_GOAL := $(PLUGIN).wasm
.PHONY: core inspect clean
.DELETE_ON_ERROR:

core: $(BUILD)/core.wasm

$(BUILD)/%.o: %.c $(SYNOD_C_HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(SYNOD_CFLAGS) $(CFLAGS) $(PLUGIN_CFLAGS) -c $< -o $@

$(BUILD)/sdk/%.o: $(SYNOD_C_SDK)/%.c $(SYNOD_C_HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(SYNOD_CFLAGS) $(CFLAGS) -c $< -o $@

# The generated file is not ours to make warning-free.
$(BUILD)/sdk/command_handler.o: $(SYNOD_C_SDK)/gen/command_handler.c $(SYNOD_C_HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(SYNOD_CFLAGS) $(CFLAGS) -w -c $< -o $@

$(BUILD)/core.wasm: $(PLUGIN_OBJS) $(SYNOD_C_OBJS) $(SYNOD_C_TYPE)
	$(CC) $(SYNOD_LDFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)
	$(WASM_TOOLS) print $@ > $(BUILD)/core.wat
	@awk '/^ *\(import "/ { split($$0, q, "\""); if (q[2] !~ /^synod:plugin\//) { \
		print "error: $@ imports " q[2] " " q[4] ": only synod:plugin interfaces are allowed" \
			" (no clock, entropy, files or environment: use ctx->timestamp_ms and synod_random_*)" > "/dev/stderr"; \
		bad = 1 } } END { exit bad }' $(BUILD)/core.wat

$(PLUGIN).wasm: $(BUILD)/core.wasm
	$(WASM_TOOLS) component new $< -o $@

inspect: $(PLUGIN).wasm
	$(SYNOD) plugin inspect $<

clean:
	rm -rf $(BUILD) $(PLUGIN).wasm

-include $(PLUGIN_OBJS:.o=.d) $(SYNOD_C_OBJS:.o=.d)

# What `synod plugin build` asks to learn the component's name.
.PHONY: synod-plugin-name
synod-plugin-name:
	@echo $(PLUGIN)
