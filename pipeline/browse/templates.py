"""The browser app's HTML: jinja2 templates with autoescape on (file names, sources and reasons are
user data). No script takes data from the page's text; the only script toggles visibility."""

from __future__ import annotations

import jinja2

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}{% endblock %}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 8px}a{color:#0b57d0}.muted{color:#777}.kept{color:#1a7f37}.dropped{color:#c62828}
form#filters{display:flex;flex-wrap:wrap;gap:8px 16px;align-items:flex-start;margin:8px 0;padding:8px;background:#f6f6f6}
form#filters label{display:flex;flex-direction:column;font-size:12px}
form#filters select[multiple]{min-height:4.5em}
details#ranges table{border-collapse:collapse}details#ranges td{padding:1px 4px}details#ranges input{width:6em}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.face{display:block;width:160px;font-size:11px;text-decoration:none;color:#222;word-break:break-all}
.face svg{width:160px;height:160px;background:#000;display:block}
.pts{fill:none;stroke-linecap:round}
.warn{background:#fff3cd;border:1px solid #e0c36b;padding:6px 10px;margin:8px 0}
.pager{margin:12px 0}.pager a,.pager span{margin-right:12px}
table.kv{border-collapse:collapse}table.kv td{border:1px solid #ddd;padding:2px 8px}table.kv td.v{text-align:right}
#whole{width:560px;max-width:100%;height:auto;background:#000}
#candidates label{display:block}
</style></head><body>
{% block body %}{% endblock %}
</body></html>
"""

_GRID = """{% extends "base" %}
{% block title %}{{ ref }}: faces{% endblock %}
{% block body %}
<h1>{{ ref }} <span class="muted">faces</span></h1>
{% for shard in unavailable %}
<p class="warn unavailable">unavailable: {{ shard.rows }} faces in {{ shard.file }} ({{ shard.error }})</p>
{% endfor %}
<form id="filters" method="get" action="./">
  {% for name, values in multi_filters %}
  <label>{{ name }}<select name="{{ name }}" id="f-{{ name }}" multiple>
    {% for value in values %}<option value="{{ value }}"{% if value in selected[name] %} selected{% endif %}>{{ value }}</option>{% endfor %}
  </select></label>
  {% endfor %}
  <label>status<select name="status" id="f-status">
    <option value="">kept and dropped</option>
    {% for value in statuses %}<option value="{{ value }}"{% if value == view.status %} selected{% endif %}>{{ value }}</option>{% endfor %}
  </select></label>
  <label>sort by<select name="sort" id="f-sort">
    <option value="">worst first ({{ default_sort }})</option>
    {% for column in sortable %}<option value="{{ column }}"{% if column == view.sort %} selected{% endif %}>{{ column }}</option>{% endfor %}
  </select></label>
  <label>order<select name="order" id="f-order">
    <option value="">default</option>
    <option value="asc"{% if view.order == "asc" %} selected{% endif %}>ascending</option>
    <option value="desc"{% if view.order == "desc" %} selected{% endif %}>descending</option>
  </select></label>
  <details id="ranges"{% if view.ranges %} open{% endif %}><summary>ranges</summary><table>
    {% for column, lo, hi in range_inputs %}<tr><td>{{ column }}</td>
      <td><input type="number" step="any" name="min_{{ column }}" id="min-{{ column }}" value="{{ lo }}"
        placeholder="min"></td>
      <td><input type="number" step="any" name="max_{{ column }}" id="max-{{ column }}" value="{{ hi }}"
        placeholder="max"></td></tr>
    {% endfor %}</table></details>
  {% if view.per_page != page_size %}<input type="hidden" name="per_page" value="{{ view.per_page }}">{% endif %}
  <button type="submit" id="apply">apply</button> <a href="./">reset</a>
</form>
<p id="summary"><span id="total">{{ page.total }}</span> faces match, of {{ faces_total }};
  sorted by <b id="sorted-by">{{ page.sort }}</b> {{ "descending" if page.descending else "ascending" }};
  page <span id="page-no">{{ view.page }}</span> of {{ page.pages }}</p>
<div class="grid" id="grid">
{% for card in cards %}
<a class="face {{ 'kept' if card.keep else 'dropped' }}" href="{{ card.href }}" data-face-id="{{ card.face_id }}">
<svg viewBox="0 0 120 120">{% if card.crop %}<image href="{{ card.crop }}" width="120" height="120"/>{% endif %}
<path class="pts" d="{{ card.points }}" stroke="#3f3" stroke-width="2.2"/></svg>
{{ card.face_id[:12] }}&hellip; {{ card.source }}<br>
{{ page.sort }} = <span class="sort-value">{{ card.sort_value }}</span><br>
<span class="{{ 'kept' if card.keep else 'dropped' }}">{{ "kept" if card.keep else "dropped" }}</span>
{% if card.reason %}<span class="muted">{{ card.reason }}</span>{% endif %}
{% if card.error %}<br><span class="warn unavailable">crop unavailable: {{ card.error }}</span>{% endif %}
</a>
{% endfor %}
</div>
<p class="pager">
{% if prev_href %}<a id="prev" href="{{ prev_href }}">&larr; previous</a>{% endif %}
{% if next_href %}<a id="next" href="{{ next_href }}">next &rarr;</a>{% endif %}
</p>
<script>
// Empty fields stay out of the URL, so a shared view reads as what it filters.
const form = document.getElementById('filters');
form.addEventListener('submit', () => form.querySelectorAll('input, select').forEach(el => {
  if (!el.value) el.disabled = true;
}));
window.addEventListener('pageshow', () => form.querySelectorAll('[disabled]').forEach(el => el.disabled = false));
</script>
{% endblock %}
"""

_FACE = """{% extends "base" %}
{% block title %}{{ ref }}: {{ face.face_id }}{% endblock %}
{% block body %}
<p><a id="back" href="{{ back_href }}">&larr; back to the grid</a></p>
<h1>{{ face.face_id }}</h1>
<p>{{ face.source }} / {{ face.split }} &middot; <span id="uri">{{ face.uri }}</span>
{% if remote_href %} &middot; <a href="{{ remote_href }}" rel="noreferrer noopener">open the remote image</a>{% endif %}</p>
<p id="rule">decision: <b class="{{ 'kept' if face.keep else 'dropped' }}" id="keep">{{ "kept" if face.keep else "dropped" }}</b>,
  weight <b id="weight">{{ weight }}</b>{% if face.reject_reason %}, rejected by <b id="reject-reason">{{ face.reject_reason }}</b>{% endif %}</p>
<div style="display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start">
<div>
{% if image_error %}<p class="warn" id="image-unavailable">original image unavailable: {{ image_error }}</p>{% endif %}
<svg id="whole" viewBox="0 0 {{ face.width }} {{ face.height }}">
{% if image %}<image href="{{ image }}" width="{{ face.width }}" height="{{ face.height }}"/>{% endif %}
<rect id="box" x="{{ box[0] }}" y="{{ box[1] }}" width="{{ box[2] }}" height="{{ box[3] }}" fill="none" stroke="#ff0" stroke-width="{{ stroke }}"/>
{% for c in candidates %}<path class="pts cand" id="cand-{{ loop.index0 }}" data-name="{{ c.name }}" d="{{ c.path }}" stroke="{{ c.color }}" stroke-width="{{ stroke * 1.6 }}"/>
{% endfor %}</svg>
<p><img id="crop" src="{{ crop }}" width="120" height="120" alt="the stored 120x120 crop"></p>
</div>
<div>
<h2>candidate labels</h2>
<div id="candidates">
{% for c in candidates %}<label><input type="checkbox" class="cand-toggle" data-target="cand-{{ loop.index0 }}" checked>
<span style="color:{{ c.color }}">&#9679;</span> {{ c.name }}{% if c.note %} <span class="muted">{{ c.note }}</span>{% endif %}</label>
{% endfor %}</div>
<h2>features and scores</h2>
<table class="kv" id="features">
{% for name, value in features %}<tr><td>{{ name }}</td><td class="v">{{ value }}</td></tr>{% endfor %}
</table>
<h2>other fields</h2>
<table class="kv" id="fields">
{% for name, value in fields %}<tr><td>{{ name }}</td><td>{{ value }}</td></tr>{% endfor %}
</table>
</div></div>
<script>
document.querySelectorAll('input.cand-toggle').forEach(box => box.addEventListener('change', () => {
  document.getElementById(box.dataset.target).style.display = box.checked ? '' : 'none';
}));
</script>
{% endblock %}
"""

_MESSAGE = """{% extends "base" %}
{% block title %}{{ title }}{% endblock %}
{% block body %}<h1>{{ title }}</h1><p id="message">{{ message }}</p><p><a href="{{ home }}">the grid</a></p>{% endblock %}
"""

ENV = jinja2.Environment(
    loader=jinja2.DictLoader({"base": _BASE, "grid": _GRID, "face": _FACE, "message": _MESSAGE}),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
)


def render(name: str, **context) -> str:
    return ENV.get_template(name).render(**context)
