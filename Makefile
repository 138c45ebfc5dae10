# A miniature DeepSeek: `make` builds, `make test` runs the tests, `make train` runs the main job.
NVCC ?= nvcc
# The GPU of this machine as nvidia-smi reports it (sm_90a on Hopper, where wgmma exists), Hopper where none is
# found; ARCH="-gencode=arch=compute_80,code=sm_80" builds for another (README: the table of GPUs).
GPU_SM := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .\r')
SM = $(if $(filter-out 90,$(filter 8% 9% 1%,$(GPU_SM))),$(GPU_SM),90a)
ARCH ?= -gencode=arch=compute_$(SM),code=sm_$(SM)
NVCCFLAGS ?= -std=c++17 -O3 -Xcompiler -Wall
LIBS = -lcublasLt -lnccl
BUILD = build

HEADERS = $(wildcard *.cuh kernels/*.cuh kernels/*.h io/*.h data/*.h)
TEST_SRCS = $(wildcard tests/*.cu)
TEST_OBJS = $(patsubst tests/%.cu,$(BUILD)/tests/%.o,$(TEST_SRCS))

# The main job: R1's pipeline in miniature. Override a stage's settings on the command line, e.g.
# make train PRETRAIN_ARGS="--steps 500". Another seed, in a folder of its own: make train SEED=1 RUNS=runs/seed1
# (the final table samples every seed's models on the same held-out problems).
SEED ?= 1234
RUNS ?= runs
# Flags for every stage, e.g. COMMON_ARGS="--precision bf16", or the pipeline without multi-token prediction (the
# MTP module neither trained nor drafting): COMMON_ARGS="--mtp-lambda 0 --mtp-lambda-late 0 --no-speculative".
COMMON_ARGS ?=
# GPUs of this machine for the training stages, one process each (data parallel with ZeRO-1, nccl.cuh; with
# COMMON_ARGS=--expert-parallel the routed experts spread over them too); the final table runs on one.
NGPU ?= 1
LAUNCH = $(if $(filter-out 1,$(NGPU)),tools/launch.sh $(NGPU) )
PRETRAIN_ARGS ?=
SFT_ARGS ?= --steps 300 --batch 64 --seq 320 --lr 5e-4 --warmup 20 --samples 0
# GRPO on countdown at difficulty 2, one policy update per batch of samples; a quarter of the prompts come from
# the whole pretraining mix and a KL term holds the policy near its start, so the other tasks are not forgotten.
# Each stage's own scoring is left to the final table (--samples 0).
RL_ARGS ?= --lr 5e-5 --warmup 20 --min-lr-frac 1 --updates 1 --task countdown --difficulty 2 \
	--replay 0.25 --kl 0.04 --prompts 32 --group 8 --samples 0
R1ZERO_ARGS ?= --steps 250
# R1 adds the language-consistency reward and runs longer: at 250 steps its gain over the cold start was 11 points.
R1_ARGS ?= --steps 400 --w-language 0.2
# The supervised baseline: the R1 run's model compute spent on more SFT on the same problems.
BASELINE_ARGS ?= --batch 64 --seq 320 --lr 1e-4 --warmup 0 --min-lr-frac 1 --task countdown --difficulty 2 \
	--replay 0.25 --sft-examples 200000 --samples 0
# The columns of the final table: the base model (answering directly too, and prompted as R1-Zero is), then the rest.
BASE = $(RUNS)/pretrain/checkpoint
EVAL_BASE = $(BASE),$(BASE):direct,$(BASE):r1zero
EVAL_TRAINED = $(RUNS)/r1zero/checkpoint,$(RUNS)/sft/checkpoint,$(RUNS)/sft_more/checkpoint,$(RUNS)/r1/checkpoint
EVAL_MODELS = $(EVAL_BASE),$(EVAL_TRAINED)
PYTHON ?= python3

.PHONY: all test train demo bench fuzz sanitize clean doctest nccl exercise arches print-arch
all: $(BUILD)/train $(BUILD)/run_tests $(BUILD)/bench_sampler $(BUILD)/bench_fp8 $(BUILD)/bench_step \
	$(BUILD)/bench_experts

$(BUILD)/train: train.cu $(HEADERS) | $(BUILD) nccl
	$(NVCC) $(NVCCFLAGS) $(ARCH) -I. -o $@ train.cu $(LIBS)

$(BUILD)/bench_%: bench/bench_%.cu $(HEADERS) $(wildcard bench/*.h) | $(BUILD) nccl
	$(NVCC) $(NVCCFLAGS) $(ARCH) -I. -o $@ $< $(LIBS)

$(BUILD)/tests/%.o: tests/%.cu $(HEADERS) $(wildcard tests/*.h) | $(BUILD) doctest nccl
	@mkdir -p $(BUILD)/tests
	$(NVCC) $(NVCCFLAGS) $(ARCH) -I. -c -o $@ $<

$(BUILD)/run_tests: $(TEST_OBJS)
	$(NVCC) $(ARCH) -o $@ $^ $(LIBS)

$(BUILD):
	@mkdir -p $(BUILD)

# What a fresh machine with the CUDA toolkit lacks: found, installed where it can be, or one line saying what to run.
doctest nccl:
	@tools/setup.sh $@

test: $(BUILD)/run_tests
	./$(BUILD)/run_tests

# pretrain (the base model) -> r1zero (GRPO on the base) and sft (cold start) -> grpo (R1), the supervised
# baseline, then one table of every model on the same held-out problems (RUNS/eval/eval.md); the RL curves go to
# RUNS/rl_curves.png where matplotlib is installed.
train: $(BUILD)/train
	$(LAUNCH)./$(BUILD)/train pretrain --out $(RUNS)/pretrain --seed $(SEED) $(PRETRAIN_ARGS) $(COMMON_ARGS)
	$(LAUNCH)./$(BUILD)/train r1zero --init $(BASE) --out $(RUNS)/r1zero --seed $(SEED) $(RL_ARGS) $(R1ZERO_ARGS) \
		$(COMMON_ARGS)
	$(LAUNCH)./$(BUILD)/train sft --init $(BASE) --out $(RUNS)/sft --seed $(SEED) $(SFT_ARGS) $(COMMON_ARGS)
	$(LAUNCH)./$(BUILD)/train grpo --init $(RUNS)/sft/checkpoint --out $(RUNS)/r1 --seed $(SEED) $(RL_ARGS) $(R1_ARGS) \
		$(COMMON_ARGS)
	$(LAUNCH)./$(BUILD)/train sft --init $(RUNS)/sft/checkpoint --out $(RUNS)/sft_more --same-flops-as $(RUNS)/r1 \
		--seed $(SEED) $(BASELINE_ARGS) $(COMMON_ARGS)
	./$(BUILD)/train eval --init $(EVAL_MODELS) --out $(RUNS)/eval $(COMMON_ARGS)
	-$(PYTHON) tools/plots.py $(RUNS)

# The interactive demo on the model that `make train` leaves; DEMO_CHECKPOINT picks another.
DEMO_CHECKPOINT ?= $(RUNS)/r1/checkpoint
demo: $(BUILD)/train
	./$(BUILD)/train chat --init $(DEMO_CHECKPOINT)

# Benchmarks print tables; run them on the GPU machine.
bench: $(BUILD)/bench_step $(BUILD)/bench_sampler $(BUILD)/bench_fp8 $(BUILD)/bench_experts
	./$(BUILD)/bench_step --precision fp8
	./$(BUILD)/bench_step --precision bf16
	./$(BUILD)/bench_sampler --prompts 256 --new 256
	./$(BUILD)/bench_fp8

# Fuzzing on the host (fuzz/fuzz.cu), under AddressSanitizer and UndefinedBehaviorSanitizer: FUZZ_SECONDS per
# target, FUZZ_INPUTS inputs per target instead where given.
FUZZ_SECONDS ?= 8
FUZZ_INPUTS ?=
HOST_SANITIZERS = $(foreach f,-fsanitize=address -fsanitize=undefined -fno-sanitize-recover=all \
	-fno-omit-frame-pointer,-Xcompiler=$(f))
$(BUILD)/fuzz: fuzz/fuzz.cu $(HEADERS) | $(BUILD)
	$(NVCC) -std=c++17 -O1 -g $(HOST_SANITIZERS) $(ARCH) -I. -o $@ $< $(LIBS)

fuzz: $(BUILD)/fuzz
	./$(BUILD)/fuzz $(FUZZ_SECONDS) 1 $(FUZZ_INPUTS)

# compute-sanitizer over the GPU tests (on a machine with a GPU): memcheck, synccheck and racecheck over all of them
# but the two that train for 50 steps to see the loss halve (the same step runs in the other training tests),
# initcheck over the kernels' own tests: on Hopper it does not see cuBLASLt's BF16 GEMMs write their outputs, and the
# model tests read those outputs everywhere (tools/initcheck_cublaslt.cu shows it on one GEMM). API errors are not
# reported: the libraries probe for kernel images this GPU lacks (cudaFuncGetAttributes fails by design).
SANITIZER = compute-sanitizer --error-exitcode 1 --report-api-errors no
LONG_TESTS = -tce="*lowers the loss*"
KERNEL_TESTS = -sf="*test_attention.cu,*test_fp8.cu,*test_layers.cu,*test_moe.cu,*test_mtp.cu,*test_grpo.cu"
$(BUILD)/initcheck_cublaslt: tools/initcheck_cublaslt.cu $(HEADERS) | $(BUILD)
	$(NVCC) $(NVCCFLAGS) $(ARCH) -I. -o $@ $< $(LIBS)

sanitize: $(BUILD)/run_tests $(BUILD)/initcheck_cublaslt
	$(SANITIZER) --tool memcheck ./$(BUILD)/run_tests -ts=gpu,fp8,fp8-cublaslt $(LONG_TESTS)
	$(SANITIZER) --tool synccheck ./$(BUILD)/run_tests -ts=gpu,fp8,fp8-cublaslt $(LONG_TESTS)
	$(SANITIZER) --tool racecheck ./$(BUILD)/run_tests -ts=gpu,fp8,fp8-cublaslt $(LONG_TESTS)
	$(SANITIZER) --tool initcheck ./$(BUILD)/run_tests -ts=gpu,fp8,fp8-cublaslt $(KERNEL_TESTS)
	-$(SANITIZER) --tool initcheck --print-limit 1 ./$(BUILD)/initcheck_cublaslt

# Coursework (exercises/README.md): `make exercise 2` runs the check of exercise 2 on the learner's file,
# `make exercise 2 SOLUTION=1` on the project's own function.
ifeq (exercise,$(firstword $(MAKECMDGOALS)))
EXERCISE := $(word 2,$(MAKECMDGOALS))
$(eval $(EXERCISE):;@:)
endif
exercise: | $(BUILD) doctest nccl
	@NVCC="$(NVCC)" ARCH="$(ARCH)" exercises/check.sh $(EXERCISE) $(if $(SOLUTION),--solution)

print-arch:
	@echo "$(ARCH)"

# Every GPU of the README's table: the program and the FP8 code (its tests and benchmark) compiled for each, as CI
# does without a GPU (`make` builds for this machine's GPU, or sm_90a).
ARCHES ?= 80 86 89 90 100 120
arches: | $(BUILD) doctest nccl
	@for f in train.cu tests/test_fp8.cu bench/bench_fp8.cu; do \
		echo "$$f: $(foreach a,$(ARCHES),sm_$(a))"; \
		$(NVCC) $(NVCCFLAGS) --threads 0 $(foreach a,$(ARCHES),-gencode=arch=compute_$(a),code=sm_$(a)) -I. -c \
			-o $(BUILD)/arches.o $$f || exit 1; \
	done

clean:
	rm -rf $(BUILD)
