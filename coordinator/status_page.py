"""The coordinator's HTML status page: one self-contained page an organiser reads at a glance.

Everything is rendered server-side (inline CSS, inline SVG plots, no JavaScript, no external
assets) so the page works offline and on any browser; it reloads itself every 5 seconds.
Inputs come from a live status snapshot and may be partial, so every field is read with a default
and every string from the input goes through ``html.escape``.
"""

from __future__ import annotations

import html
import time

from proto import console

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;background:#fafafa;padding:0 1em}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .5em;border-bottom:1px solid #ddd}
.summary span{display:inline-block;margin:0 1.2em .4em 0}.summary b{color:#555;font-weight:600}
.badge{padding:.15em .6em;border-radius:1em;color:#fff;background:#888;font-weight:600}
.badge.open{background:#2a8f3c}.badge.sync{background:#2b6cb0}.badge.publish{background:#7b4bb7}
.badge.waiting{background:#c77c00}.badge.stopped{background:#b03030}.reason{color:#a05a00}
.stages{display:flex;flex-wrap:wrap;gap:.6em}
.stage{border:1px solid #bbb;border-radius:6px;padding:.5em .8em;background:#fff;min-width:9em}
.stage.warning{border-color:#c33;background:#fdecec}.stage .warn{color:#c33;font-weight:700}
table{border-collapse:collapse;background:#fff;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:1em}svg{background:#fff;border:1px solid #ddd}
.muted{color:#888}
.alert{border:2px solid #c33;background:#fdecec;border-radius:6px;padding:.6em .9em;margin:.6em 0}
.alert b{color:#a00}.alert code{white-space:pre-wrap}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(value, default=0.0) -> float:
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def human_bytes(n) -> str:
    return console.human_bytes(_num(n))


def _fmt(value, spec=",.0f", none="–") -> str:
    return none if value is None else format(_num(value), spec)


def _ago(now: float, then) -> str:
    if then is None:
        return "never"
    s = max(0.0, now - _num(then))
    if s < 120:
        return f"{s:.0f}s ago"
    return f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _tick(v: float) -> str:
    return f"{v:.4g}"


COLOURS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#4a5568")


def svg_line_plot(points: list[tuple[float, float]] | dict[str, list[tuple[float, float]]], width, height, title, y_label,
                  svg_id="") -> str:
    """An SVG line plot with axes, min/max tick labels, a polyline and one circle per point: one series, or one per
    name of a dict (each in its own colour, with a legend)."""
    ident = f' id="{_e(svg_id)}"' if svg_id else ""
    left, right, top, bottom = 60, 15, 25, 35
    pw, ph = width - left - right, height - top - bottom
    out = [f'<svg{ident} xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{_e(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
           f'<text x="14" y="{top + ph / 2}" font-size="11" text-anchor="middle" '
           f'transform="rotate(-90 14 {top + ph / 2})">{_e(y_label)}</text>']
    named = points if isinstance(points, dict) else {"": points}
    series = {name: [(_num(x), _num(y)) for x, y in pts if x is not None and y is not None] for name, pts in named.items()}
    series = {name: pts for name, pts in series.items() if pts}
    every = [p for pts in series.values() for p in pts]
    if len(every) < 2:
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" '
                   f'font-size="12" fill="#888">no data yet</text></svg>')
        return "".join(out)
    xs, ys = [p[0] for p in every], [p[1] for p in every]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    xs_span, ys_span = (x1 - x0) or 1.0, (y1 - y0) or 1.0

    def sx(x):
        return left + (x - x0) / xs_span * pw

    def sy(y):
        return top + ph - (y - y0) / ys_span * ph

    out += [f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{_tick(y1)}</text>',
            f'<text x="{left - 4}" y="{top + ph}" font-size="10" text-anchor="end">{_tick(y0)}</text>',
            f'<text x="{left}" y="{top + ph + 14}" font-size="10" text-anchor="start">{_tick(x0)}</text>',
            f'<text x="{left + pw}" y="{top + ph + 14}" font-size="10" text-anchor="end">{_tick(x1)}</text>',
            f'<text x="{left + pw / 2}" y="{height - 4}" font-size="11" text-anchor="middle">round</text>']
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = [(sx(x), sy(y)) for x, y in pts]
        out.append(f'<polyline class="series" data-series="{_e(name)}" fill="none" stroke="{colour}" stroke-width="1.5" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>')
        r = 2.5 if len(coords) <= 100 else 1.2
        out += [f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colour}"/>' for x, y in coords]
        if name:
            out.append(f'<text x="{left + 6}" y="{top + 14 + 13 * i}" font-size="11" fill="{colour}">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _table(table_id: str, headers: list[str], rows: list[list[str]], empty: str) -> str:
    ident = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{h}</th>" for h in headers)
    if not rows:
        return f'<table{ident}><tr>{head}</tr><tr><td colspan="{len(headers)}" class="muted">{empty}</td></tr></table>'
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f"<table{ident}><tr>{head}</tr>{body}</table>"


def _td(value, num=False) -> str:
    return f'<td class="num">{value}</td>' if num else f"<td>{value}</td>"


def _d(value) -> dict:
    return value if isinstance(value, dict) else {}


def _sum(d) -> float:
    return sum(_num(v) for v in d.values()) if isinstance(d, dict) else 0.0


def _pct(value) -> str:
    return "–" if value is None else f"{100 * _num(value):.1f}%"


def data_section(data) -> str:
    """The data phase in force, the phase schedule and the mix actually trained (sources, objectives)."""
    d = _d(data)
    if not d:
        return "<p class='muted'>no data information</p>"
    phase = _d(d.get("phase"))
    phases = [p for p in d.get("phases") or [] if isinstance(p, dict)]
    current = phase.get("index")
    line = (f"<p id='data-phase'><b>phase {_e(current)}</b> of {len(phases) or '?'}: "
            f"<b>{_e(phase.get('objective', '?'))}</b></p>") if phase else ""
    phase_rows = []
    for i, p in enumerate(phases):
        weights = ", ".join(f"{_e(name)} {_pct(w)}" for name, w in _d(p.get("weights")).items() if _num(w) > 0)
        marker = " ◀" if i == current else ""
        phase_rows.append([_td(f"{i}{marker}", True), _td(_e(p.get("objective"))), _td(_fmt(p.get("from_tokens", 0)), True),
                           _td(_fmt(p.get("until_tokens"), none="end"), True), _td(weights or "–"),
                           _td(_fmt(p.get("tokens", 0)), True)])
    phases_html = _table("data-phases", ["phase", "objective", "from tokens", "until tokens", "weights", "trained tokens"],
                         phase_rows, "no phases")
    trained = _d(d.get("tokens_per_source"))
    total = _sum(trained)
    mix_rows = []
    for src in [x for x in d.get("sources") or [] if isinstance(x, dict)]:
        n = _num(trained.get(src.get("name"), src.get("trained_tokens", 0)))
        mix_rows.append([_td(_e(src.get("name"))), _td(_e(src.get("format"))), _td(_e(src.get("path"))),
                         _td(_fmt(src.get("weight"), ".3g"), True), _td(_fmt(src.get("heldout", 0)), True), _td(_fmt(n), True),
                         _td(_pct(n / total) if total else "–", True)])
    shares = _d(d.get("objective_shares"))
    objective_tokens = _d(d.get("tokens_per_objective"))
    for name in sorted(set(shares) | set(objective_tokens), key=str):
        mix_rows.append([_td(f"<span class='muted'>objective</span> {_e(name)}"), _td(""), _td(""), _td(""), _td(""),
                         _td(_fmt(objective_tokens.get(name)), True), _td(_pct(shares.get(name)), True)])
    held = f"held out {_pct(d['heldout_share'])}" if isinstance(d.get("heldout_share"), (int, float)) else "held out"
    mix_html = _table("data-mix", ["source / objective", "format", "path", "weight", held, "trained tokens", "share"], mix_rows,
                      "no sources")
    return line + phases_html + "<br>" + mix_html


def compression_line(train: dict) -> str:
    """The run's compression settings in one line (what crosses boundaries and what replicas sync)."""
    acts = train.get("activation_compression", "none")
    if acts == "aqsgd":
        acts = f"AQ-SGD {train.get('activation_bits')}-bit (first visits {train.get('activation_first_bits')}-bit)"
    elif acts == "direct":
        acts = f"direct {train.get('activation_bits')}-bit"
    grads = f"{train.get('gradient_bits')}-bit" if train.get("gradient_bits") else "none"
    sync = train.get("sync_compression", "none")
    if sync == "cocktail":
        sync = (f"cocktail (random {train.get('sync_random_ratio')}, top-k {train.get('sync_topk_ratio')}, "
                f"{train.get('sync_bits')}-bit, skip p={train.get('p_skip')}, resync every {train.get('resync_every')}, "
                f"exact for the first {train.get('sync_warmup_rounds', 0)} rounds)")
    elif sync == "sparseloco":
        sync = (f"sparseloco (every {train.get('sync_every')} rounds, top {train.get('sync_density'):.2%} of "
                f"{train.get('sync_chunk')}-value chunks, {train.get('sync_bits')}-bit, error decay {train.get('sync_error_decay')}, "
                f"outer lr {train.get('outer_lr')}, exact for the first {train.get('sync_warmup_rounds', 0)} rounds)")
    else:
        sync = "exact gradient sum"
    return _e(f"compression: activations {acts} · gradients {grads} · replica sync {sync}")


def _where(d: dict) -> str:
    """'stage 1, peer alice (3f2a...)' from a failure's stage, peer and peer name."""
    parts = []
    if d.get("stage") is not None:
        parts.append(f"stage {_e(d.get('stage'))}")
    if d.get("peer"):
        name = d.get("peer_name")
        parts.append(f"peer {_e(name)} ({_e(d.get('peer'))})" if name else f"peer {_e(d.get('peer'))}")
    return ", ".join(parts) or "the pipeline"


def trouble_banner(status: dict) -> str:
    """A red box while training is stalled (what failed, where, what comes next); else the latest failure, if recent."""
    stalled, failure = _d(status.get("stalled")), _d(status.get("last_failure"))
    now = _num(status.get("now"), time.time())
    if stalled:
        what = "stopped" if stalled.get("gave_up") else "stalled"
        nxt = "" if stalled.get("gave_up") else (
            f" Next try in {_fmt(stalled.get('retry_in_seconds'), '.0f')} s." if _num(stalled.get("retry_in_seconds")) > 0 else " Trying again now.")
        error = (f"<br>Failing at {_where(stalled)}: <code>{_e(stalled.get('error'))}</code>" if stalled.get("error")
                 else f"<br>{_e(stalled.get('cause'))}")
        return (f"<div class='alert' id='stalled'><b>Training is {what}:</b> round {_e(stalled.get('round'))} trained nothing "
                f"{_e(stalled.get('attempts'))} time(s) in a row, since {_ago(now, stalled.get('since'))}.{nxt}{error}</div>")
    if failure and now - _num(failure.get("time")) < 300:
        return (f"<p class='reason' id='last-failure'>microbatch {_e(failure.get('microbatch'))} of round {_e(failure.get('round'))} "
                f"failed {_ago(now, failure.get('time'))} at {_where(failure)}: <code>{_e(failure.get('error'))}</code></p>")
    return ""


def evaluation_line(evaluation: dict, now: float) -> str:
    """Who evaluates the checkpoints, and the volunteers that do (--eval-on peer)."""
    if not evaluation:
        return ""
    on = str(evaluation.get("on") or "?")
    who = {"coordinator": "by the coordinator", "peer": "by volunteers (peer join --role eval)", "off": "off"}.get(on, on)
    workers = [w for w in evaluation.get("workers") or [] if isinstance(w, dict)]
    listed = "; ".join(f"{_e(w.get('name') or w.get('id'))} on {_e(w.get('device'))}: "
                       + (f"evaluating round {_e(w['evaluating'])}" if w.get("evaluating") is not None else "idle")
                       + f", {_fmt(w.get('evaluated', 0))} done, seen {_ago(now, w.get('last_seen'))}" for w in workers)
    if on == "peer" and not workers:
        listed = "<span class='warn'>no evaluating volunteer has asked for work yet</span>"
    return f"<p class='muted' id='evaluation'>Evaluation {who}" + (f": {listed}" if listed else "") + "</p>"


def evaluation_cell(result, round_, queue: tuple[list, list]) -> str:
    """A checkpoint's held-out perplexity per source and accuracy per task, or where its evaluation stands
    (``queue``: the rounds being evaluated, and those waiting)."""
    if not result:
        evaluating, pending = queue
        return "<span class='muted'>" + ("evaluating…" if round_ in evaluating else "queued" if round_ in pending else "–") + "</span>"
    result = _d(result)
    if result.get("error"):
        return f"<span class='warn' title='{_e(result['error'])}'>evaluation failed</span>"
    ppl = ", ".join(f"{_e(k)} {_fmt(v, ',.2f')}" for k, v in _d(result.get("perplexity")).items())
    acc = ", ".join(f"{_e(k)} {_fmt(_d(v).get('acc'), '.2f')}/{_fmt(_d(v).get('acc_norm'), '.2f')}"
                    for k, v in _d(result.get("accuracy")).items())
    return f"ppl {ppl}<br>acc/acc_norm {acc}"


def render_page(status: dict, rounds: list[dict]) -> str:
    """The full HTML page for one status snapshot and the per-round history (oldest first)."""
    s = _d(status)
    rounds = [r for r in (rounds or []) if isinstance(r, dict)]
    now = _num(s.get("now"), time.time())
    model = _d(s.get("model"))
    phase = str(s.get("phase") or "unknown")
    reason = s.get("reason") or ""

    last_done = f"<span class='muted'>(last done {_e(s.get('round', '–'))})</span>"
    summary = [("round", f"{_e(s.get('current_round', '–'))} {last_done}"),
               ("loss", _fmt(s.get("loss"), ".4f")), ("tokens", _fmt(s.get("tokens", 0))),
               ("tokens/s", _fmt(s.get("tokens_per_second"), ",.1f")),
               ("samples dropped", _fmt(s.get("samples_dropped", 0)))]
    prog = _d(s.get("progress"))
    if prog:
        done, target = _fmt(prog.get("microbatches_done", 0)), _fmt(prog.get("microbatches_target", 0))
        dropped, flying = _fmt(prog.get("microbatches_dropped", 0)), _fmt(prog.get("in_flight", 0))
        summary.append(("microbatches", f"{done}/{target} ({dropped} dropped, {flying} in flight)"))
    model_line = (f"{_e(model.get('preset', '?'))} · {_e(model.get('n_layer', '?'))} layers · "
                  f"d={_e(model.get('n_embd', '?'))} · {_fmt(model.get('parameters'))} parameters") if model else ""
    header = (f"<h1>hometrain run {_e(s.get('run', '–'))} <span class='badge {_e(phase)}'>{_e(phase)}</span></h1>"
              + trouble_banner(s)
              + (f"<p class='reason'>{_e(reason)}</p>" if reason and not s.get("stalled") else "")
              + (f"<p class='muted'>{model_line}</p>" if model_line else "")
              + (f"<p class='muted' id='compression'>{compression_line(_d(s.get('train')))}</p>" if s.get("train") else "")
              + (f"<p class='muted' id='trust'>{'private run (join tokens; members-only data plane)' if s.get('private') else 'open run'}"
                 f" · signing key <code>{_e(s['key_fingerprint'])}</code> (peer join --coordinator-key)</p>" if s.get("key_fingerprint") else "")
              + "<div class='summary'>" + "".join(f"<span><b>{k}:</b> {v}</span>" for k, v in summary) + "</div>")

    boxes = []
    for st in [x for x in s.get("stages") or [] if isinstance(x, dict)]:
        layers = st.get("layers") or ["?", "?"]
        a, b = (list(layers) + ["?", "?"])[:2]
        online, replicas = st.get("online", 0) or 0, st.get("replicas", 0) or 0
        warn = online == 0
        boxes.append(f"<div class='stage{' warning' if warn else ''}'><b>stage {_e(st.get('index', '?'))}</b><br>"
                     f"blocks {_e(a)}–{_e(b - 1 if isinstance(b, int) else b)}<br>{_e(online)}/{_e(replicas)} replicas online<br>"
                     f"{_fmt(st.get('throughput'), ',.2f')} samples/s"
                     + ("<br><span class='warn'>no replica</span>" if warn else "") + "</div>")
    boxes_html = "".join(boxes) or "<span class='muted'>no stages</span>"
    stage_map = f'<div id="stage-map" class="stages">{boxes_html}</div>'

    peer_rows = [[_td(_e(p.get("id"))), _td(_e(p.get("name"))), _td(_e(p.get("stage", "–")), True),
                  _td(_e(p.get("device"))),
                  _td(_e(p.get("state")) + (f" <span class='warn' title='{_e(p['flagged'])}'>flagged</span>" if p.get("flagged") else "")),
                  _td(_e(p.get("reachability") or "–")),
                  _td(_fmt(p.get("throughput"), ",.2f"), True),
                  _td(human_bytes(p["link_bytes_per_second"]) + "/s" if p.get("link_bytes_per_second") else "–", True),
                  _td(_fmt(p.get("microbatches", 0)) + (f" <span class='warn'>({_fmt(p['microbatches_failed'])} failed)</span>"
                                                          if p.get("microbatches_failed") else ""), True),
                  _td(human_bytes(_sum(p.get("bytes_sent"))), True),
                  _td(human_bytes(_sum(p.get("bytes_received"))), True), _td(_ago(now, p.get("last_seen")))]
                 for p in s.get("peers") or [] if isinstance(p, dict)]
    peers = _table("peers", ["id", "name", "stage", "device", "state", "reached", "samples/s", "link", "microbatches",
                             "bytes up", "bytes down", "last seen"], peer_rows, "no peers")

    loss_pts = [(r.get("round"), r.get("loss")) for r in rounds]
    tps_pts = [(r.get("round"), r.get("tokens_per_second")) for r in rounds]
    evaluated = [(c.get("round"), _d(c.get("eval"))) for c in s.get("checkpoints") or [] if isinstance(c, dict) and c.get("eval")]
    ppl_series: dict[str, list] = {}
    for round_, result in evaluated:
        for source, value in _d(result.get("perplexity")).items():
            ppl_series.setdefault(str(source), []).append((round_, value))
    plots = ("<div class='plots'>" + svg_line_plot(loss_pts, 520, 260, "loss per round", "loss", "loss-plot")
             + svg_line_plot(tps_pts, 520, 260, "tokens/s per round", "tokens/s", "tps-plot")
             + svg_line_plot(ppl_series, 520, 260, "held-out perplexity per checkpoint", "perplexity", "eval-plot") + "</div>")

    wire_rows = []
    for kind, w in sorted(_d(s.get("wire")).items(), key=lambda kv: str(kv[0])):
        w = _d(w)
        nbytes, raw = _num(w.get("bytes")), _num(w.get("uncompressed_bytes"))
        wire_rows.append([_td(_e(kind)), _td(human_bytes(nbytes), True), _td(human_bytes(raw), True),
                          _td(f"{raw / nbytes:.2f}×" if nbytes else "–", True)])
    wire = _table("wire", ["kind", "bytes", "uncompressed", "ratio"], wire_rows, "no traffic yet")

    hist_rows = [[_td(_e(r.get("round", "–")), True), _td(_fmt(r.get("loss"), ".4f"), True),
                  _td(_fmt(r.get("tokens", 0)), True), _td(_fmt(r.get("samples", 0)), True),
                  _td(_fmt(r.get("dropped", 0)), True), _td(_fmt(r.get("duration"), ",.1f") + " s", True),
                  _td(_fmt(r.get("tokens_per_second"), ",.1f"), True)] for r in reversed(rounds[-20:])]
    history = _table("rounds", ["round", "loss", "tokens", "samples", "dropped", "duration", "tokens/s"],
                     hist_rows, "no rounds yet")

    ck_rows = []
    queue = (_d(s.get("evaluation")).get("evaluating") or [], _d(s.get("evaluation")).get("pending") or [])
    for c in [x for x in s.get("checkpoints") or [] if isinstance(x, dict)]:
        url = str(c.get("url") or "")
        links = (f"<a href='{_e(url + 'manifest.json')}'>manifest.json</a> · "
                 f"<a href='{_e(url + 'config.json')}'>config.json</a>") if url else "–"
        ck_rows.append([_td(_e(c.get("round", "–")), True), _td(_e(c.get("path"))),
                        _td(_fmt(c.get("tokens", 0)), True), _td(_fmt(c.get("loss"), ".4f"), True),
                        _td(human_bytes(c.get("bytes", 0)), True), _td(evaluation_cell(c.get("eval"), c.get("round"), queue)), _td(links)])
    checkpoints = _table("checkpoints", ["round", "path", "tokens", "loss", "size", "evaluation", "files"], ck_rows,
                         "no checkpoints yet")

    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta http-equiv=\"refresh\" content=\"5\"><meta name='viewport' content='width=device-width'>"
            f"<title>hometrain · {_e(s.get('run', 'status'))}</title><style>{CSS}</style></head><body>"
            f"{header}<h2>Stages</h2>{stage_map}<h2>Peers</h2>{peers}<h2>Progress</h2>{plots}"
            f"<h2>Data</h2>{data_section(s.get('data'))}<h2>Wire bytes</h2>{wire}<h2>Last {min(20, len(rounds))} rounds</h2>{history}"
            f"<h2>Checkpoints</h2>{evaluation_line(_d(s.get('evaluation')), now)}{checkpoints}</body></html>")
