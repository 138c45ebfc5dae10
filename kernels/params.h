// params.h: the flat parameter buffer, described tensor by tensor.
//
// A model keeps all its parameters in one FP32 buffer (with its BF16 copy, gradients and Adam moments beside it):
// one AdamW launch updates every tensor, and a checkpoint is the buffer cut into named tensors. Modules declare
// their tensors here (a name, a shape, a region, an initialization) and keep the index they get back; once every
// module has declared its tensors, finalize() places them region after region:
//
//   [ decayed: the matrices | not decayed: norm weights | buffers: state that is not trained ]
//     <----------------- trained: gradients, Adam moments ---------------->
//
// so that AdamW takes the first `trained` values and decays the first `decayed` of them, and nothing else needs to
// know which tensor is which. Within a region, tensors follow each other in the order they were declared: tensors
// declared one after another are adjacent (a module can treat them as one matrix).
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

enum class Region { Decayed, NotDecayed, Buffer };

// How init_weights fills a tensor: Normal(0, initializer_range), the same scaled down for projections that write into
// the residual stream, ones (norm weights) or zeros (buffers).
enum class Init { Normal, ResidualNormal, Ones, Zeros };

struct ParamTensor {
    std::string name;  // the Hugging Face checkpoint name
    std::vector<long> shape;
    Region region;
    Init init;
    double active = 1.0;  // the share of tokens whose forward pass uses it (a routed expert: top_k / n_experts)
    long offset = -1;     // in the flat buffer, set by finalize()
    int position = -1;    // rank in buffer order: the stream of its random initialization
    long numel() const {
        long n = 1;
        for (long d : shape) n *= d;
        return n;
    }
};

struct ParamLayout {
    std::vector<ParamTensor> tensors;  // in declaration order
    long decayed = 0, trained = 0, total = 0;

    int add(const std::string& name, std::vector<long> shape, Region region, Init init, double active = 1.0) {
        if (finalized_) throw std::logic_error("ParamLayout: " + name + " declared after finalize()");
        tensors.push_back({name, std::move(shape), region, init, active});
        return int(tensors.size()) - 1;
    }
    int matrix(const std::string& name, long rows, long cols, Init init = Init::Normal, double active = 1.0) {
        return add(name, {rows, cols}, Region::Decayed, init, active);
    }
    int norm(const std::string& name, long n) { return add(name, {n}, Region::NotDecayed, Init::Ones); }
    int buffer(const std::string& name, long n) { return add(name, {n}, Region::Buffer, Init::Zeros); }

    void finalize() {
        long offset = 0;
        int position = 0;
        for (Region region : {Region::Decayed, Region::NotDecayed, Region::Buffer}) {
            for (ParamTensor& t : tensors)
                if (t.region == region) t.offset = offset, t.position = position++, offset += t.numel();
            (region == Region::Decayed ? decayed : region == Region::NotDecayed ? trained : total) = offset;
        }
        finalized_ = true;
    }

    long offset(int tensor) const { return tensors[size_t(tensor)].offset; }
    const ParamTensor& operator[](int tensor) const { return tensors[size_t(tensor)]; }

   private:
    bool finalized_ = false;
};
