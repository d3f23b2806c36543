"""The sentence graph and its ranking.

Nodes are sentences. Two kinds of edges join them:

* adjacency — consecutive sentences of a document (a pronoun in one usually
  points into the one before);
* shared terms — within a document group (a SQuAD article), each sentence is
  joined to its few most similar sentences by TF-IDF cosine over retrieval
  terms, weighted by that similarity.

networkx computes the graph's PageRank (the static centrality that becomes the
shards' ranking); the row-normalised transition matrix is kept so the router
can run a few steps of PageRank personalised to a question's terms.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def tfidf_rows(term_matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Log-tf x idf rows, L2-normalised."""
    x = term_matrix.astype(np.float32).tocsr(copy=True)
    x.data = 1.0 + np.log(x.data)
    df = np.bincount(x.indices, minlength=x.shape[1]).astype(np.float32)
    idf = np.log((1.0 + x.shape[0]) / (1.0 + df)) + 1.0
    x = x @ sp.diags(idf.astype(np.float32))
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.diags((1.0 / norms).astype(np.float32)) @ x


def sentence_graph(
    term_matrix: sp.csr_matrix,
    sent_doc: np.ndarray,
    sent_group: np.ndarray,
    adjacency_weight: float = 1.0,
    top_similar: int = 3,
    min_similarity: float = 0.15,
) -> sp.csr_matrix:
    """Symmetric weighted adjacency matrix of the sentence graph."""
    n = term_matrix.shape[0]
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    # adjacency within a document
    same = np.flatnonzero(sent_doc[1:] == sent_doc[:-1])
    rows.append(same)
    cols.append(same + 1)
    vals.append(np.full(len(same), adjacency_weight, dtype=np.float32))
    # shared-term similarity within a group
    x = tfidf_rows(term_matrix)
    order = np.argsort(sent_group, kind="stable")
    bounds = np.flatnonzero(np.diff(sent_group[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        xg = x[members]
        for lo in range(0, len(members), 256):
            block = (xg[lo:lo + 256] @ xg.T).toarray()
            idx = np.arange(block.shape[0])
            block[idx, lo + idx] = 0.0
            k = min(top_similar, block.shape[1] - 1)
            if k <= 0:
                continue
            top = np.argpartition(-block, k - 1, axis=1)[:, :k]
            sims = np.take_along_axis(block, top, axis=1)
            keep = sims >= min_similarity
            r = np.repeat(members[lo + idx][:, None], k, axis=1)[keep]
            rows.append(r)
            cols.append(members[top[keep]])
            vals.append(sims[keep].astype(np.float32))
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    v = np.concatenate(vals)
    a = sp.coo_matrix((v, (r, c)), shape=(n, n)).tocsr()
    a.sum_duplicates()  # adjacent and similar: both weights count
    # symmetric; an edge found from both of its ends counts once
    return a.maximum(a.T).tocsr()


def pagerank(w: sp.csr_matrix, alpha: float = 0.85) -> np.ndarray:
    """Static PageRank of the graph (networkx)."""
    import networkx as nx

    n = w.shape[0]
    if n == 0:
        return np.zeros(0)
    g = nx.from_scipy_sparse_array(w, edge_attribute="weight")
    # The error shrinks by at least `alpha` per iteration, so reaching
    # N * tol takes up to log(tol / 2) / log(alpha) (about 120 at 0.85)
    # iterations on a tiny graph: networkx's default of 100 gave up on a
    # lone 3-sentence document.
    pr = nx.pagerank(g, alpha=alpha, weight="weight", tol=1e-8, max_iter=1000)
    return np.fromiter((pr[i] for i in range(n)), dtype=np.float64, count=n)


def transition_transposed(w: sp.csr_matrix) -> sp.csr_matrix:
    """P^T for P = D^-1 W (row-stochastic; sentences without edges keep no mass)."""
    deg = np.asarray(w.sum(axis=1)).ravel()
    inv = np.zeros_like(deg, dtype=np.float32)
    inv[deg > 0] = 1.0 / deg[deg > 0]
    return (sp.diags(inv) @ w).T.tocsr().astype(np.float32)
