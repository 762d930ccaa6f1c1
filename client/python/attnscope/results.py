"""Arrays from captured blocks, the same code for a live stream (StreamResult) and a stored sample
(Sample): blocks come per query block and per decode step; these assemble them per layer.

    r.attention(layer)           dense [heads, T, T]; head_mean/head_max [1, T, T];
                                 pooled [heads, ceil(T/P), ceil(T/P)]; top_k values [heads, R, K]
    r.indices(layer)             top_k key indices [heads, R, K] (int32; -1 where a row has fewer)
    r.positions(layer)           the query position of each row of attention() (tile starts for pooled)
    r.statistic(kind, layer)     (positions, values [heads, N]): row statistics per query position,
                                 key statistics per prompt key
    r.statistics_table()         every statistic as a pandas DataFrame (when pandas is installed)

Rows a capture left out (rows=last:N, ranges) are simply absent: attention() is square only when
every row was captured; positions() says which rows there are. Entries above the diagonal are 0."""
import html

import numpy as np

FORM_PREFIX = "FORM_"


def form_name(value):
    """'dense' from 'FORM_DENSE' or 'dense' (stored samples keep the proto's enum name)."""
    value = str(value or "dense")
    return value[len(FORM_PREFIX):].lower() if value.startswith(FORM_PREFIX) else value.lower()


class Captured:
    """The one reading of captured blocks, the base of Sample (a stored file) and StreamResult (a
    stream): arrays per layer, statistics, tables. A subclass holds the blocks as `_attention`,
    `_indices` and `_statistics` ({BlockKey: ndarray}, per instance: no shared class-level
    defaults) and says what produced them: `form`, `pool`, `pool_op`, `prompt_length`, `heads` (the
    model's head number of each array row) and `tokens` (the piece at each position)."""

    __slots__ = ()

    # -- what was captured -------------------------------------------------------------------
    @property
    def captured_layers(self):
        return sorted({k.layer for k in self._attention} | {k.layer for k in self._statistics})

    @property
    def statistic_kinds(self):
        return sorted({k.stat for k in self._statistics})

    @property
    def reduced_heads(self):
        """head_mean / head_max: attention() holds one row for all the captured heads."""
        return self.form in ("head_mean", "head_max")

    def head_index(self, head):
        """The row of the model's head `head` in attention() and statistic() arrays."""
        heads = list(self.heads)
        if head not in heads:
            raise KeyError(f"head {head} was not captured (captured heads: {', '.join(map(str, heads))})")
        return heads.index(head)

    def head_label(self, head=None):
        """How a picture names a row: 'head 5', or for head_mean/head_max 'mean over heads 2, 5'."""
        if self.reduced_heads:
            heads = list(self.heads)
            what = "all heads" if len(heads) == getattr(self, "model_heads", -1) else "heads " + ", ".join(map(str, heads))
            return f"{self.form[5:]} over {what}"
        return f"head {head}"

    def _keys(self, table, layer, phase, stat=None):
        keys = [k for k in table if k.layer == layer and k.stat == stat and (phase is None or k.phase == phase)]
        if not keys:
            what = f"statistic {stat!r}" if stat else "attention"
            raise KeyError(f"no {what} for layer {layer}{'' if phase is None else ' in ' + phase} "
                           f"(captured layers: {self.captured_layers}"
                           f"{', statistics: ' + ', '.join(self.statistic_kinds) if self.statistic_kinds else ''})")
        return sorted(keys, key=lambda k: (k.query_begin, k.step))

    def _rows(self, key, blk, keys):
        """Query positions of a block's rows."""
        if self.form != "pooled":
            return np.arange(key.query_begin, key.query_begin + blk.shape[1])
        # Pooled blocks hold tiles: their rows run to the next block of the phase, or the prompt's end.
        later = [k.query_begin for k in keys if k.phase == key.phase and k.query_begin > key.query_begin]
        end = min(later + [key.query_begin + blk.shape[1] * self.pool])
        if key.phase == "prefill":
            end = min(end, max(self.prompt_length, key.query_begin + 1))
        else:
            end = key.query_begin + 1
        return np.arange(key.query_begin, end)

    # -- attention ----------------------------------------------------------------------------
    def positions(self, layer, phase=None):
        """Query position of each row attention(layer, phase) returns (for pooled: the first
        position of each tile row)."""
        keys = self._keys(self._attention, layer, phase)
        rows = np.concatenate([self._rows(k, self._attention[k], keys) for k in keys])
        if self.form == "pooled":
            return np.unique(rows // self.pool) * self.pool
        return rows

    def attention(self, layer, phase=None):
        """The layer's attention assembled from its blocks (see the module's docstring)."""
        keys = self._keys(self._attention, layer, phase)
        if self.form == "pooled":
            return self._pooled(layer, keys)
        if self.form == "top_k":
            return self._stack_top_k(self._attention, keys, 0.0, np.float32)
        blocks = [(self._rows(k, self._attention[k], keys), self._attention[k]) for k in keys]
        rows = np.concatenate([r for r, _ in blocks])
        heads = blocks[0][1].shape[0]
        width = max(b.shape[2] for _, b in blocks)
        have = sum(b.nbytes for _, b in blocks)
        if any(b.ndim != 3 or b.shape[0] != heads for _, b in blocks):
            raise ValueError(f"attention blocks of layer {layer} disagree on their shape")
        if heads * len(rows) * width * 4 > 16 * have + (64 << 20):
            raise ValueError(f"layer {layer} would assemble to {heads} x {len(rows)} x {width} from only {have} "
                             "bytes of blocks; the blocks are inconsistent")
        out = np.zeros((heads, len(rows), width), np.float32)
        at = 0
        for r, b in blocks:
            out[:, at:at + len(r), :b.shape[2]] = b
            at += len(r)
        return out

    def indices(self, layer, phase=None):
        """top_k: the key index of each value in attention(layer, phase); -1 pads short rows."""
        if self.form != "top_k":
            raise ValueError(f"indices come with form='top_k' captures; this one is {self.form!r}")
        keys = self._keys(self._attention, layer, phase)
        return self._stack_top_k(self._indices, keys, -1, np.int32)

    def _stack_top_k(self, table, keys, fill, dtype):
        blocks = [table[k] for k in keys]
        heads, k = blocks[0].shape[0], max(b.shape[2] for b in blocks)
        out = np.full((heads, sum(b.shape[1] for b in blocks), k), fill, dtype)
        at = 0
        for b in blocks:
            out[:, at:at + b.shape[1], :b.shape[2]] = b
            at += b.shape[1]
        return out

    def _pooled(self, layer, keys):
        """Tiles of the whole matrix (what view._pool computes from a dense capture): each block's
        tiles are turned back into sums (mean) and placed by their first row, then divided by the
        rows captured in the tile and the keys it covers. Exact when prefill blocks start at
        multiples of P (query blocks are powers of two)."""
        p = self.pool
        placed = [(self._rows(k, self._attention[k], keys), self._attention[k].astype(np.float64)) for k in keys]
        heads = placed[0][1].shape[0]
        end = int(max(r[-1] + 1 for r, _ in placed))
        n_rows = -(-end // p)
        n_cols = max(b.shape[2] for _, b in placed)
        have = sum(b.nbytes for _, b in placed)
        if heads * n_rows * n_cols * 8 > 16 * have + (64 << 20):
            raise ValueError(f"layer {layer} would assemble to {heads} x {n_rows} x {n_cols} tiles from only {have} "
                             "bytes of blocks; the blocks are inconsistent")
        acc = np.zeros((heads, n_rows, n_cols))
        rows_in = np.zeros(n_rows)
        mean = self.pool_op != "max"
        for rows, b in placed:
            # The block's key length: causal (its last row + 1), or the prompt's for prefill
            # blocks padded to it; the one its tile count agrees with.
            last, tk = int(rows[-1]) + 1, b.shape[2]
            key_len = last if -(-last // p) == tk else (
                self.prompt_length if -(-self.prompt_length // p) == tk else tk * p)
            key_counts = np.minimum(p, np.maximum(key_len - np.arange(tk) * p, 0))
            for i in range(b.shape[1]):
                tile_rows = rows[i * p:(i + 1) * p]
                if len(tile_rows) == 0:
                    continue
                t = int(tile_rows[0]) // p
                if mean:
                    acc[:, t, :tk] += b[:, i, :] * len(tile_rows) * key_counts
                else:
                    acc[:, t, :tk] = np.maximum(acc[:, t, :tk], b[:, i, :])
                rows_in[t] += len(tile_rows)
        keep = rows_in > 0
        out = acc[:, keep]
        if mean:
            width = min(end, n_cols * p)
            cols = np.minimum(p, np.maximum(width - np.arange(n_cols) * p, 1))
            out = out / (rows_in[keep][:, None] * cols[None, :])
        return out.astype(np.float32)

    # -- statistics ---------------------------------------------------------------------------
    def statistic(self, kind, layer, phase=None):
        """(positions, values [heads, N] float32) of one statistic: row statistics (row_entropy,
        sink_mass, local_mass) per query position, prefill rows then decode steps; key statistics
        (key_score, key_score_variance) per prompt key."""
        keys = self._keys(self._statistics, layer, phase, stat=kind)
        blocks = [self._statistics[k] for k in keys]
        positions = np.concatenate([np.arange(k.query_begin, k.query_begin + b.shape[1]) for k, b in zip(keys, blocks)])
        return positions, np.concatenate(blocks, axis=1).astype(np.float32)

    def statistics_table(self):
        """Every statistic as a long pandas DataFrame: kind, layer, head, position, value (and
        token, where the tokens are known). Needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("statistics_table() needs pandas (Debian: python3-pandas)") from None
        tokens = list(self.tokens or [])  # the piece at each position
        frames = []
        for kind in self.statistic_kinds:
            for layer in sorted({k.layer for k in self._statistics if k.stat == kind}):
                pos, values = self.statistic(kind, layer)
                heads = self._head_numbers(values.shape[0])
                frame = pd.DataFrame({
                    "kind": kind, "layer": layer, "head": np.repeat(heads, len(pos)),
                    "position": np.tile(pos, len(heads)), "value": values.reshape(-1)})
                if tokens:
                    frame["token"] = [tokens[p] if p < len(tokens) else "" for p in frame["position"]]
                frames.append(frame)
        if not frames:
            return pd.DataFrame(columns=["kind", "layer", "head", "position", "value"])
        return pd.concat(frames, ignore_index=True)

    def to_xarray(self, layer, phase=None):
        """attention(layer, phase) as an xarray DataArray with head, query and key coordinates.
        Needs xarray."""
        try:
            import xarray as xr
        except ImportError:
            raise ImportError("to_xarray() needs xarray (Debian: python3-xarray)") from None
        a = self.attention(layer, phase)
        dims = ("head", "row", "rank") if self.form == "top_k" else ("head", "query", "key")
        coords = {dims[1]: self.positions(layer, phase),
                  "head": [self.head_label()] if self.reduced_heads else self._head_numbers(a.shape[0])}
        if self.form != "top_k":
            step = self.pool if self.form == "pooled" else 1
            coords["key"] = np.arange(a.shape[2]) * step
        return xr.DataArray(a, dims=dims, coords=coords, name=f"attention layer {layer}",
                            attrs={"form": self.form, "layer": layer})

    # -- interventions (issue 24) ---------------------------------------------------------------
    # A subclass gives `_divergence_rows` and `_kv_rows` in the stored metadata's layout (the
    # "divergence" and "kv_decisions" lists client/cpp/sample_writer.cpp writes) and `_model_shape`
    # (layers, heads).
    DIVERGENCE_COLUMNS = ("step", "kl", "top1_agree", "rank", "token", "logprob_full", "logprob_intervened")

    def divergence(self):
        """Per generated step of a request with interventions: KL(full || intervened), top-1
        agreement, the chosen token's rank under the full model, the token and its log-probability
        under each model (a pandas DataFrame; -logprob_intervened.mean() is the intervened model's
        loss on the generated tokens, -logprob_full.mean() the unmodified model's)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("divergence() needs pandas (Debian: python3-pandas)") from None
        rows = self._divergence_rows
        return pd.DataFrame({c: [r[c] for r in rows] for c in self.DIVERGENCE_COLUMNS})

    def lost_mass(self):
        """[steps, layers, heads] float32: the attention mass the full model puts, per step, on the
        keys the intervened model does not see."""
        layers, heads = self._model_shape
        return np.array([list(r["lost_mass"]) for r in self._divergence_rows], np.float32).reshape(-1, layers, heads)

    def kept(self, layer, step=0):
        """[kv_heads, keys] bool: the prompt keys the KV policy kept in `layer` at its decision
        `step` (0: end of prefill)."""
        d = self._kv_row(layer, step)
        n = int(d["kv_heads"]) * int(d["keys"])
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(d["kept"]), np.uint8), bitorder="little")[:n]
        if bits.size != n:
            raise ValueError(f"layer {layer}: {bits.size} kept bits for {n} (kv head, key) pairs")
        return bits.astype(bool).reshape(int(d["kv_heads"]), int(d["keys"]))

    def decision_steps(self, layer=None):
        """The steps at which the KV policy decided (0: end of prefill; s: after decode step s),
        for `layer` (None: any layer)."""
        return sorted({int(d["step"]) for d in self._kv_rows if layer is None or int(d["layer"]) == layer})

    def evicted(self, layer, head, rows, cols):
        """bool [len(rows), len(cols)]: True where the KV policy's decisions hide key position
        cols[j] from query position rows[i] in `layer` for the model's query head `head` (a decision
        over keys [0, K) holds from query position K on, until the next; query heads share their
        kv head's keys). All False without a policy."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        out = np.zeros((len(rows), len(cols)), bool)
        decisions = sorted((d for d in self._kv_rows if int(d["layer"]) == layer), key=lambda d: int(d["step"]))
        if not decisions:
            return out
        heads = self._model_shape[1]
        kv_heads = int(decisions[0]["kv_heads"])
        if not 0 <= head < heads:
            raise KeyError(f"head {head} is outside the model's {heads} heads")
        group = heads // kv_heads if kv_heads and heads % kv_heads == 0 else 1
        for i, d in enumerate(decisions):
            keys = int(d["keys"])
            until = int(decisions[i + 1]["keys"]) if i + 1 < len(decisions) else np.iinfo(np.int64).max
            kept = self.kept(layer, int(d["step"]))[head // group]
            in_rows = (rows >= keys) & (rows < until)
            col_ok = (cols >= 0) & (cols < keys)
            lost = np.zeros(len(cols), bool)
            lost[col_ok] = ~kept[cols[col_ok]]
            out |= in_rows[:, None] & lost[None, :]
        return out

    def bytes_freed(self):
        """The bytes of keys and values the KV policy evicted, over all layers and decisions."""
        return sum(int(d["bytes_freed"]) for d in self._kv_rows)

    def _kv_row(self, layer, step):
        for d in self._kv_rows:
            if int(d["layer"]) == layer and int(d["step"]) == step:
                return d
        raise KeyError(f"no KV policy decision for layer {layer} at step {step} "
                       f"({len(self._kv_rows)} decisions: a request with kv_policy has one per layer)")

    def _head_numbers(self, rows):
        """The model's head numbers of `rows` array rows (their indices if the capture does not say)."""
        heads = list(self.heads or [])
        return np.asarray(heads if len(heads) == rows else range(rows))

    # -- Jupyter --------------------------------------------------------------------------------
    HTML_INLINE_LIMIT = 8 << 20  # larger pages are not inlined into the notebook
    HTML_INLINE_BUDGET = 1_000_000  # numbers an inlined page embeds at most (tiles past it)

    def _summary_rows(self):
        rows = [("form", self.form), ("layers", ", ".join(map(str, self.captured_layers)) or "-")]
        if self.statistic_kinds:
            rows.append(("statistics", ", ".join(self.statistic_kinds)))
        text = getattr(self, "text", "")
        if text:
            rows.append(("generated", text[:200]))
        return rows

    def _repr_html_(self):
        """In Jupyter: a compact summary, then the interactive page (attnscope.view.html_page)."""
        title = type(self).__name__
        table = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                        f"{html.escape(str(v))}</td></tr>" for k, v in self._summary_rows())
        out = f"<div><b>attnscope {title}</b><table>{table}</table></div>"
        try:
            from attnscope import view
            # The size is known from shapes before anything is built.
            if view.page_bytes(self, self.HTML_INLINE_BUDGET) > self.HTML_INLINE_LIMIT:
                return out + ("<div><i>the interactive page is too large to inline; write it with "
                              "attnscope.view.html_page(...)</i></div>")
            page = view.html_page(self, budget=self.HTML_INLINE_BUDGET)
        except Exception as e:  # a summary is still worth showing
            return out + f"<div><i>no picture: {html.escape(str(e))}</i></div>"
        return out + (f"<iframe srcdoc=\"{html.escape(page, quote=True)}\" "
                      "style='width:100%;height:900px;border:0'></iframe>")
