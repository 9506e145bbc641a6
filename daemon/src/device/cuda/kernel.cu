// kvtier gather/scatter: one launch copies many contiguous segments (every layer and part of many
// blocks) between engine KV tensors and the pinned pool. Thread block i copies segment i, 16 bytes
// per thread per step when both ends are 16-byte aligned, byte by byte otherwise.
// `args` holds the segments' source addresses, then their destination addresses, then their sizes.
extern "C" __global__ void kvtier_copy(const unsigned long long* args, int segments) {
    int seg = blockIdx.x;
    if (seg >= segments) return;
    const unsigned long long* src = args;
    const unsigned long long* dst = args + segments;
    const unsigned long long* bytes = args + 2 * (unsigned long long)segments;
    const unsigned char* s = (const unsigned char*)src[seg];
    unsigned char* d = (unsigned char*)dst[seg];
    unsigned long long n = bytes[seg];
    unsigned long long words = (((unsigned long long)s | (unsigned long long)d) % 16 == 0) ? n / 16 : 0;
    for (unsigned long long i = threadIdx.x; i < words; i += blockDim.x) {
        ((uint4*)d)[i] = ((const uint4*)s)[i];
    }
    for (unsigned long long i = words * 16 + threadIdx.x; i < n; i += blockDim.x) {
        d[i] = s[i];
    }
}
