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

# The main job: R1's pipeline in miniature. Override a stage's settings on the command line, e.g.
# make train PRETRAIN_ARGS="--steps 500".
PRETRAIN_ARGS ?=
SFT_ARGS ?= --steps 300 --batch 64 --seq 320 --lr 5e-4 --warmup 20
RL_ARGS ?= --steps 100 --lr 1e-4 --warmup 0 --min-lr-frac 1 --rl-task countdown --rl-difficulty 2 --prompts 32 --group 8
R1_ARGS ?= --w-language 0.2
PYTHON ?= python3

.PHONY: all test train demo bench clean
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

# pretrain (the base model) -> r1zero (GRPO on the base) and sft (cold start) -> grpo (R1); each stage ends with
# its evaluation table; the RL curves go to runs/rl_curves.png where matplotlib is installed.
train: $(BUILD)/train
	./$(BUILD)/train pretrain --out runs/pretrain $(PRETRAIN_ARGS)
	./$(BUILD)/train r1zero --init runs/pretrain/checkpoint --out runs/r1zero $(RL_ARGS)
	./$(BUILD)/train sft --init runs/pretrain/checkpoint --out runs/sft $(SFT_ARGS)
	./$(BUILD)/train grpo --init runs/sft/checkpoint --out runs/r1 $(RL_ARGS) $(R1_ARGS)
	-$(PYTHON) tools/plots.py runs

# The interactive demo on the model that `make train` leaves; DEMO_CHECKPOINT picks another.
DEMO_CHECKPOINT ?= runs/r1/checkpoint
demo: $(BUILD)/train
	./$(BUILD)/train chat --init $(DEMO_CHECKPOINT)

# Benchmarks print tables; run them on the GPU machine.
bench: $(BUILD)/bench_sampler
	./$(BUILD)/bench_sampler 256 256

clean:
	rm -rf $(BUILD)
