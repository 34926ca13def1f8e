// fmoe's trajectory hint for one decoding token (maps/predict.py Trajectory), in one call per layer where numpy
// makes a dozen small ones: the observed routing folded into the match with the stored maps, and the experts of
// the next layers picked. Same rules and order as the numpy path; single-threaded (it runs between launches on
// the thread that drives the GPU, beside the CPU experts' threads).
// Legend: M = stored maps, L = MoE layers, E = experts, K = experts per token, m = maps blended, d = layers ahead.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

extern "C" {

// dots [M] += sum_k w[k] * st[ids[k], :], st = one layer's stored maps [E, M]; returns sum_k w[k]^2.
float traj_observe(float* dots, int M, const float* st, const int64_t* ids, const float* w, int K) {
    float on = 0.f;
    for (int k = 0; k < K; ++k) {
        const float* row = st + ids[k] * (int64_t)M;
        const float wk = w[k];
        for (int j = 0; j < M; ++j) dots[j] += wk * row[j];
        on += wk * wk;
    }
    return on;
}

// The same from the stored maps kept sparse (a map holds K experts a layer): row r = layer * E + expert holds
// maps idx[offs[r]:offs[r + 1]] with values val[...]; ids are a layer's selected experts.
float traj_observe_sparse(float* dots, const int64_t* offs, const int32_t* idx, const float* val, int layer,
                          int E, const int64_t* ids, const float* w, int K) {
    float on = 0.f;
    for (int k = 0; k < K; ++k) {
        const int64_t r = (int64_t)layer * E + ids[k];
        const float wk = w[k];
        for (int64_t j = offs[r]; j < offs[r + 1]; ++j) dots[idx[j]] += wk * val[j];
        on += wk * wk;
    }
    return on;
}

struct Pick { float prio; int order, layer, expert; float use; };

// The m-th largest of score [M] (m <= M), in one pass keeping the m largest seen.
static float mth_largest(const std::vector<float>& score, int m) {
    std::vector<float> top(score.begin(), score.begin() + m);
    std::make_heap(top.begin(), top.end(), std::greater<float>());  // a min-heap of the m largest
    for (size_t j = m; j < score.size(); ++j)
        if (score[j] > top.front()) {
            std::pop_heap(top.begin(), top.end(), std::greater<float>());
            top.back() = score[j];
            std::push_heap(top.begin(), top.end(), std::greater<float>());
        }
    return top.front();
}

// After layer `layer` (its 1/|stored prefix| inv_norm [M]): the picks of layers first..last-1 whose use (K x the
// predicted share) is at least min_use, highest priority first (ties: the order they were made in). S: the stored
// maps [M, L, E]. Writes at most cap picks to out_layer, out_expert, out_use; returns how many.
int traj_picks(const float* dots, const float* inv_norm, int M, float on, const float* S, int L, int E,
               int first, int last, int top_m, int K, float min_use, float decay,
               int* out_layer, int* out_expert, float* out_use, int cap) {
    std::vector<float> score(M);
    for (int j = 0; j < M; ++j) score[j] = dots[j] * inv_norm[j];
    const int m = std::min(top_m, M);
    const float thr = mth_largest(score, m);  // the first m maps at or above it, in index order
    std::vector<int> best;
    for (int j = 0; j < M && (int)best.size() < m; ++j)
        if (score[j] >= thr) best.push_back(j);
    const float norm = std::max(std::sqrt(on), 1e-6f);
    std::vector<float> w(best.size());
    float top = -INFINITY;
    for (size_t i = 0; i < best.size(); ++i) {
        const float sc = score[best[i]] / norm;
        top = std::max(top, sc);
        w[i] = std::max(sc, 0.f) + 1e-6f;
    }
    const double need = 1.0 - std::min(std::max((double)top, 0.0), 1.0) - 1e-6;
    std::vector<Pick> out;
    std::vector<float> pred(E);
    std::vector<std::pair<float, int>> cand;
    for (int row = 0; row < last - first; ++row) {
        std::fill(pred.begin(), pred.end(), 0.f);
        for (size_t i = 0; i < best.size(); ++i) {
            const float* s = S + ((int64_t)best[i] * L + first + row) * E;
            for (int e = 0; e < E; ++e) pred[e] += w[i] * s[e];
        }
        float tot = 0.f;
        for (int e = 0; e < E; ++e) tot += pred[e];
        tot = std::max(tot, 1e-12f);
        cand.clear();
        for (int e = 0; e < E; ++e)
            if (pred[e] * ((float)K / min_use) >= tot) cand.emplace_back(pred[e] / tot, e);
        std::sort(cand.begin(), cand.end(), [](auto& a, auto& b) { return a > b; });  // share, then expert, down
        size_t take = cand.size();
        double acc = 0.0;
        for (size_t n = 0; n < cand.size(); ++n) {
            acc += cand[n].first;
            if (acc >= need) { take = n + 1; break; }
        }
        take = std::min(cand.size(), std::max(take, (size_t)K));
        const float dec = std::pow(decay, (float)row);
        for (size_t n = 0; n < take; ++n)
            out.push_back({cand[n].first * dec, (int)out.size(), first + row, cand[n].second,
                           std::min(cand[n].first * K, 1.f)});
    }
    std::stable_sort(out.begin(), out.end(), [](const Pick& a, const Pick& b) { return a.prio > b.prio; });
    const int n = std::min((int)out.size(), cap);
    for (int i = 0; i < n; ++i) out_layer[i] = out[i].layer, out_expert[i] = out[i].expert, out_use[i] = out[i].use;
    return n;
}

}  // extern "C"
