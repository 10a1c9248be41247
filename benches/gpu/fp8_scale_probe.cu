// Does cuBLASLt run DeepSeek's FP8 block scaling on this GPU (issue "7 of 10")?
//
// For each pair of scale modes (weights: BLK128x128_32F or VEC128_32F; activations: VEC128_32F),
// asks cuBLASLt for an algorithm, runs Y = X W^T in FP8 E4M3 with f32 scales and bf16 output, and
// compares with a host reference under both candidate scale layouts (K-block index fastest, or
// the M/N index fastest), so the probe also finds the layout cuBLASLt expects. Then times the
// DeepSeek-V3 expert GEMMs (gate+up: N 4096, K 7168; down: N 7168, K 2048) at several token
// counts. Build and run on the GPU machine:
//   nvcc -O2 -std=c++17 -arch=sm_90 benches/gpu/fp8_scale_probe.cu -lcublasLt -o fp8_probe && ./fp8_probe
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CK(x)                                                                               \
    do {                                                                                    \
        auto e_ = (x);                                                                      \
        if (e_ != 0) {                                                                      \
            std::printf("FAIL %s:%d %s = %d\n", __FILE__, __LINE__, #x, (int)e_);          \
            std::exit(1);                                                                   \
        }                                                                                   \
    } while (0)

struct Case {
    int tokens, n, k;
};

static const char* mode_name(int m) {
    switch (m) {
        case CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F: return "VEC128_32F";
        case CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F: return "BLK128x128_32F";
        case CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F: return "SCALAR_32F";
        default: return "?";
    }
}

// One GEMM: A = weights (k x n col-major = [n][k] row-major, op T), B = activations (k x tokens
// col-major = [tokens][k] row-major), D = bf16 [tokens][n] row-major (n x tokens col-major).
struct Gemm {
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, ld;
    cublasLtMatmulHeuristicResult_t heur[8];
    int found = 0;
    cublasStatus_t status = CUBLAS_STATUS_SUCCESS;

    Gemm(cublasLtHandle_t h, Case c, int wmode, int xmode, const float* ws, const float* xs, void* workspace,
         size_t wsbytes, uint32_t align = 0)
        : lt(h) {
        CK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
        CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
        CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof nn));
        cublasLtMatmulMatrixScale_t am = (cublasLtMatmulMatrixScale_t)wmode, bm = (cublasLtMatmulMatrixScale_t)xmode;
        status = cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &am, sizeof am);
        if (status) return;
        status = cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &bm, sizeof bm);
        if (status) return;
        CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws, sizeof ws));
        CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs, sizeof xs));
        CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, c.k, c.n, c.k));
        CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, c.k, c.tokens, c.k));
        CK(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, c.n, c.tokens, c.n));
        cublasLtMatmulPreference_t pref;
        CK(cublasLtMatmulPreferenceCreate(&pref));
        CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsbytes,
                                                sizeof wsbytes));
        if (align) {
            cublasLtMatmulPreferenceAttributes_t as[4] = {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                          CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                          CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                          CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
            for (auto a : as) CK(cublasLtMatmulPreferenceSetAttribute(pref, a, &align, sizeof align));
        }
        status = cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, ld, ld, pref, 8, heur, &found);
        cublasLtMatmulPreferenceDestroy(pref);
    }

    cublasStatus_t run(const void* w, const void* x, void* y, void* workspace, size_t wsbytes, cudaStream_t s) {
        float one = 1.0f, zero = 0.0f;
        return cublasLtMatmul(lt, desc, &one, w, la, x, lb, &zero, y, ld, y, ld, &heur[0].algo, workspace, wsbytes, s);
    }
};

int main() {
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    std::printf("device %s sm_%d%d, cuBLASLt %zu\n", p.name, p.major, p.minor, cublasLtGetVersion());
    cublasLtHandle_t lt;
    CK(cublasLtCreate(&lt));
    size_t wsbytes = 64 << 20;
    void* workspace;
    CK(cudaMalloc(&workspace, wsbytes));
    cudaStream_t s;
    CK(cudaStreamCreate(&s));

    // --- correctness, small shape, both layouts of each scale tensor ---
    Case c{256, 384, 512};
    int kb = c.k / 128, nb = c.n / 128;
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::uniform_real_distribution<float> ud(0.25f, 4.f);
    std::vector<__nv_fp8_e4m3> w8(c.n * c.k), x8(c.tokens * c.k);
    std::vector<float> wq(c.n * c.k), xq(c.tokens * c.k);
    for (size_t i = 0; i < w8.size(); i++) { w8[i] = __nv_fp8_e4m3(nd(rng)); wq[i] = float(w8[i]); }
    for (size_t i = 0; i < x8.size(); i++) { x8[i] = __nv_fp8_e4m3(nd(rng)); xq[i] = float(x8[i]); }
    std::vector<float> wsc_blk(nb * kb), wsc_vec(c.n * kb), xsc(c.tokens * kb);
    for (auto& v : wsc_blk) v = ud(rng);
    for (auto& v : wsc_vec) v = ud(rng);
    for (auto& v : xsc) v = ud(rng);
    void *dw, *dx, *dy;
    float *dws_blk, *dws_vec, *dxs;
    CK(cudaMalloc(&dw, w8.size()));
    CK(cudaMalloc(&dx, x8.size()));
    CK(cudaMalloc(&dy, c.tokens * c.n * 2));
    CK(cudaMalloc(&dws_blk, wsc_blk.size() * 4));
    CK(cudaMalloc(&dws_vec, wsc_vec.size() * 4));
    CK(cudaMalloc(&dxs, xsc.size() * 4));
    CK(cudaMemcpy(dw, w8.data(), w8.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dx, x8.data(), x8.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dws_blk, wsc_blk.data(), wsc_blk.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dws_vec, wsc_vec.data(), wsc_vec.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dxs, xsc.data(), xsc.size() * 4, cudaMemcpyHostToDevice));

    int wmodes[2] = {CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F};
    for (int wm : wmodes) {
        const float* dws = wm == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F ? dws_blk : dws_vec;
        Gemm g(lt, c, wm, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, dws, dxs, workspace, wsbytes);
        std::printf("weights %s, activations VEC128_32F: set %d, heuristic status %d, %d algorithms\n",
                    mode_name(wm), (int)g.status, (int)g.status, g.found);
        if (g.status || g.found == 0) continue;
        auto st = g.run(dw, dx, dy, workspace, wsbytes, s);
        CK(cudaStreamSynchronize(s));
        std::printf("  matmul status %d\n", (int)st);
        if (st) continue;
        std::vector<__nv_bfloat16> y(c.tokens * c.n);
        CK(cudaMemcpy(y.data(), dy, y.size() * 2, cudaMemcpyDeviceToHost));
        // Reference under each layout guess: w scale index (kblock-fastest or n-fastest), x scale
        // index (kblock-fastest or token-fastest).
        for (int wl = 0; wl < 2; wl++)
            for (int xl = 0; xl < 2; xl++) {
                double maxrel = 0, num = 0, den = 0;
                for (int t = 0; t < c.tokens; t++)
                    for (int n = 0; n < c.n; n++) {
                        double acc = 0;
                        for (int b = 0; b < kb; b++) {
                            double part = 0;
                            for (int i = b * 128; i < (b + 1) * 128; i++) part += (double)xq[t * c.k + i] * wq[n * c.k + i];
                            double swv;
                            if (wm == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F)
                                swv = wl == 0 ? wsc_blk[(n / 128) * kb + b] : wsc_blk[b * nb + n / 128];
                            else
                                swv = wl == 0 ? wsc_vec[n * kb + b] : wsc_vec[b * c.n + n];
                            double sx = xl == 0 ? xsc[t * kb + b] : xsc[b * c.tokens + t];
                            acc += part * swv * sx;
                        }
                        double got = __bfloat162float(y[t * c.n + n]);
                        num += (got - acc) * (got - acc);
                        den += acc * acc;
                        maxrel = std::fmax(maxrel, std::fabs(got - acc) / (std::fabs(acc) + 1.0));
                    }
                std::printf("  layout w:%s x:%s  rel L2 %.2e  max %.2e%s\n", wl == 0 ? "kblock-fastest" : "n-fastest",
                            xl == 0 ? "kblock-fastest" : "token-fastest", std::sqrt(num / den), maxrel,
                            std::sqrt(num / den) < 1e-2 ? "  <== matches" : "");
            }
    }

    // --- which token counts and pointer alignments have an algorithm ---
    for (uint32_t align : {0u, 16u, 64u, 128u, 256u}) {
        std::printf("min alignment %3u B, tokens:", align);
        for (int n : {1, 2, 3, 5, 8, 13, 16, 17, 24, 32, 33, 64, 100, 128, 1000}) {
            Case cc{n, 4096, 7168};
            Gemm g(lt, cc, CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, dws_blk,
                   dxs, workspace, wsbytes, align);
            std::printf(" %d:%s", n, (g.status == 0 && g.found > 0) ? "ok" : "NO");
        }
        std::printf("\n");
    }

    // --- speed: DeepSeek-V3 expert GEMMs, BLK128x128 weights, VEC128 activations ---
    Case shapes[] = {{16, 4096, 7168}, {64, 4096, 7168}, {512, 4096, 7168}, {4096, 4096, 7168},
                     {16, 7168, 2048}, {512, 7168, 2048}, {4096, 7168, 2048}};
    for (auto sh : shapes) {
        void *bw, *bx, *by;
        float *bws, *bxs;
        CK(cudaMalloc(&bw, (size_t)sh.n * sh.k));
        CK(cudaMalloc(&bx, (size_t)sh.tokens * sh.k));
        CK(cudaMalloc(&by, (size_t)sh.tokens * sh.n * 2));
        CK(cudaMalloc(&bws, (size_t)(sh.n / 128) * (sh.k / 128) * 4));
        CK(cudaMalloc(&bxs, (size_t)sh.tokens * (sh.k / 128) * 4));
        CK(cudaMemset(bw, 0x38, (size_t)sh.n * sh.k));
        CK(cudaMemset(bx, 0x38, (size_t)sh.tokens * sh.k));
        CK(cudaMemset(bws, 0, (size_t)(sh.n / 128) * (sh.k / 128) * 4));
        CK(cudaMemset(bxs, 0, (size_t)sh.tokens * (sh.k / 128) * 4));
        Gemm g(lt, sh, CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, bws, bxs,
               workspace, wsbytes);
        if (g.status || g.found == 0) {
            std::printf("tokens %5d n %5d k %5d: no algorithm (status %d)\n", sh.tokens, sh.n, sh.k, (int)g.status);
            continue;
        }
        for (int i = 0; i < 3; i++) CK(g.run(bw, bx, by, workspace, wsbytes, s));
        cudaEvent_t a, b;
        cudaEventCreate(&a);
        cudaEventCreate(&b);
        int iters = 50;
        cudaEventRecord(a, s);
        for (int i = 0; i < iters; i++) g.run(bw, bx, by, workspace, wsbytes, s);
        cudaEventRecord(b, s);
        CK(cudaEventSynchronize(b));
        float ms;
        cudaEventElapsedTime(&ms, a, b);
        ms /= iters;
        double flops = 2.0 * sh.tokens * sh.n * sh.k, bytes = (double)sh.n * sh.k + (double)sh.tokens * sh.k;
        std::printf("tokens %5d n %5d k %5d: %.4f ms, %.1f TFLOP/s, %.2f TB/s of FP8 operands\n", sh.tokens, sh.n,
                    sh.k, ms, flops / ms / 1e9, bytes / ms / 1e9);
        cudaFree(bw); cudaFree(bx); cudaFree(by); cudaFree(bws); cudaFree(bxs);
    }
    std::printf("done\n");
    return 0;
}
