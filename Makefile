# A miniature DeepSeek: `make` builds, `make test` runs the tests, `make train` runs the main job.
NVCC ?= nvcc
# Hopper (H100/H200) by default; e.g. ARCH="-gencode=arch=compute_80,code=sm_80" for an A100.
ARCH ?= -gencode=arch=compute_90a,code=sm_90a
NVCCFLAGS ?= -std=c++17 -O3 -Xcompiler -Wall
LIBS = -lcublasLt
BUILD = build

HEADERS = $(wildcard *.cuh *.h data/*.h)
TEST_SRCS = $(wildcard tests/*.cu)
TEST_OBJS = $(patsubst tests/%.cu,$(BUILD)/tests/%.o,$(TEST_SRCS))

# The main job's settings; override on the command line, e.g. make train TRAIN_ARGS="--steps 500".
TRAIN_ARGS ?=

.PHONY: all test train bench clean
all: $(BUILD)/train $(BUILD)/run_tests $(BUILD)/bench_sampler

$(BUILD)/train: train.cu $(HEADERS) | $(BUILD)
	$(NVCC) $(NVCCFLAGS) $(ARCH) -I. -o $@ train.cu $(LIBS)

$(BUILD)/bench_%: bench/bench_%.cu $(HEADERS) | $(BUILD)
	$(NVCC) $(NVCCFLAGS) $(ARCH) -I. -o $@ $< $(LIBS)

$(BUILD)/tests/%.o: tests/%.cu $(HEADERS) $(wildcard tests/*.h) | $(BUILD)
	@mkdir -p $(BUILD)/tests
	$(NVCC) $(NVCCFLAGS) $(ARCH) -I. -c -o $@ $<

$(BUILD)/run_tests: $(TEST_OBJS)
	$(NVCC) $(ARCH) -o $@ $^ $(LIBS)

$(BUILD):
	@mkdir -p $(BUILD)

test: $(BUILD)/run_tests
	./$(BUILD)/run_tests

train: $(BUILD)/train
	./$(BUILD)/train pretrain --out runs/pretrain $(TRAIN_ARGS)

# Benchmarks print tables; run them on the GPU machine.
bench: $(BUILD)/bench_sampler
	./$(BUILD)/bench_sampler 256 256

clean:
	rm -rf $(BUILD)
