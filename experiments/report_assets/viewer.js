/* fcjax trace viewer: reads the page's columnar JSON (#fcjax-data), shows a sortable,
 * filterable, paginated list of examples and, on demand, one trace's steps (#ex=ID), or on
 * the compare page one question's traces from every run (#q=ID). Writes what it rendered
 * into #fcjax-selfcheck (JSON) for the browser test. No network, no dependencies. */
(function () {
  'use strict';
  var T0 = performance.now();
  var CHECK = { ready: false, errors: [] };
  function writeCheck() {
    var el = document.getElementById('fcjax-selfcheck');
    if (el) el.textContent = JSON.stringify(CHECK);
  }
  window.addEventListener('error', function (e) { CHECK.errors.push(String(e.message)); writeCheck(); });

  var PAGE = 50;
  var DATA = JSON.parse(document.getElementById('fcjax-data').textContent);
  var root = document.getElementById('viewer');

  function h(tag, attrs, children) {
    var el = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (k === 'text') el.textContent = attrs[k];
      else if (k === 'cls') el.className = attrs[k];
      else if (k.slice(0, 2) === 'on') el.addEventListener(k.slice(2), attrs[k]);
      else el.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) {
      if (c != null) el.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
    });
    return el;
  }
  // the URL fragment holds the view: ex / q (opened trace), sort, dir, show, find
  function params() { return new URLSearchParams(location.hash.slice(1)); }
  function setParams(changes, replace) {
    var p = params();
    for (var k in changes) { if (changes[k] == null || changes[k] === '') p.delete(k); else p.set(k, changes[k]); }
    var hash = '#' + p.toString();
    if (!replace) { location.hash = hash; return; }
    try { history.replaceState(null, '', hash); } catch (e) { /* some file:// settings refuse */ }
  }
  function fmt(v, d) { return v == null ? '–' : v.toFixed(d == null ? 2 : d); }
  // sequential colour scale, 0 light -> 1 dark blue
  var STOPS = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
  function shade(v) {
    var x = Math.max(0, Math.min(1, v)) * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
    var c = STOPS[i].map(function (a, j) { return Math.round(a + (STOPS[i + 1][j] - a) * f); });
    return 'rgb(' + c.join(',') + ')';
  }
  function valueCell(v, what) {
    if (v == null) return h('td', { cls: 'v na', title: what + ': no value' }, ['–']);
    var td = h('td', { cls: 'v', title: what + ' = ' + v.toFixed(4), 'data-v': String(v) }, [fmt(v)]);
    td.style.background = shade(v);
    if (v > 0.62) td.style.color = '#fff';
    return td;
  }
  function scaleKey() {
    var grad = 'linear-gradient(90deg,' + [0, .25, .5, .75, 1].map(shade).join(',') + ')';
    var bar = h('span', { cls: 'bar' }); bar.style.background = grad;
    return h('span', { cls: 'scale' }, ['0', bar, '1 (D, C, F; hover a cell for its value)']);
  }
  function correctMark(ok, pred) {
    if (pred === null) return h('span', { cls: 'bad', title: 'no answer extracted' }, ['∅']);
    return ok ? h('span', { cls: 'ok', title: 'correct' }, ['✓']) : h('span', { cls: 'bad', title: 'wrong' }, ['✗']);
  }

  /* ---- one run's trace ------------------------------------------------------------------ */
  function samplesFor(run, row) {
    var s = run.samples; if (!s) return null;
    var lo = 0, hi = s.row.length;
    while (lo < hi) { var m = (lo + hi) >> 1; if (s.row[m] < row) lo = m + 1; else hi = m; }
    var out = [];
    for (var i = lo; i < s.row.length && s.row[i] === row; i++) out.push(i);
    return out;
  }
  function renderTrace(run, i, compact) {
    var ex = run.examples, st = run.steps, names = run.estimators;
    var box = h('div', { cls: 'trace', 'data-example': ex.id[i] });
    var head = h('div', { cls: 'trace-head' }, [
      h(compact ? 'h4' : 'h3', { text: (compact ? run.title + ': ' : '') + ex.id[i] }),
      h('span', null, ['answer ', h('b', { cls: 'pred', text: ex.prediction[i] == null ? '(none)' : ex.prediction[i] }),
        ' · gold ', h('b', { cls: 'gold', text: ex.gold[i] == null ? '–' : ex.gold[i] }), ' ', correctMark(ex.correct[i], ex.prediction[i])]),
      h('span', { text: ex.n_steps[i] + ' steps · finish: ' + ex.finish[i] })]);
    box.appendChild(head);
    if (!compact) box.appendChild(h('div', { cls: 'question', text: ex.question[i] }));
    // trace-level values
    var tl = h('table', { cls: 'num' }), tr1 = h('tr', null, [h('th', { text: 'trace' })]),
      trC = h('tr', null, [h('th', { text: 'C' })]), trF = h('tr', null, [h('th', { text: 'F' })]);
    names.forEach(function (n) {
      tr1.appendChild(h('th', { text: n }));
      trC.appendChild(valueCell(ex.conf[n][i], 'trace C ' + n));
      trF.appendChild(valueCell(ex.faith[n][i], 'trace F ' + n));
    });
    [tr1, trC, trF].forEach(function (r) { tl.appendChild(r); });
    box.appendChild(tl);
    var tbl = h('table', { cls: 'steps' });
    var r1 = h('tr', null, [h('th', { rowspan: '2', text: '#' }), h('th', { rowspan: '2', text: 'step text' }),
      h('th', { rowspan: '2', title: 'decisiveness: how sure the step sounds', text: 'D' })]);
    var r2 = h('tr');
    names.forEach(function (n) {
      r1.appendChild(h('th', { colspan: '2', cls: 'est', text: n }));
      r2.appendChild(h('th', { title: 'internal confidence of ' + n, text: 'C' }));
      r2.appendChild(h('th', { title: 'faithfulness 1 - |D - C|', text: 'F' }));
    });
    var thead = h('thead', null, [r1, r2]); tbl.appendChild(thead);
    var body = h('tbody');
    var a = ex.step0[i], b = a + ex.n_steps[i], sampleRows = [], nSamples = 0;
    for (var r = a; r < b; r++) {
      var row = h('tr', { cls: 'step', 'data-step': String(st.step[r]) }, [
        h('td', { text: String(st.step[r]) }), h('td', { cls: 'text', text: st.text[r] }), valueCell(st.d[r], 'D')]);
      names.forEach(function (n) {
        row.appendChild(valueCell(st.conf[n][r], 'C ' + n));
        row.appendChild(valueCell(st.faith[n][r], 'F ' + n));
      });
      body.appendChild(row);
      var idx = samplesFor(run, r);
      if (idx && idx.length) sampleRows.push(body.appendChild(samplesRow(run, idx, 3 + 2 * names.length)));
      nSamples += idx ? idx.length : 0;
    }
    // a short trace's continuations are shown open; a long one's stay folded
    if (nSamples <= 30) sampleRows.forEach(function (tr) { tr.querySelector('details').open = true; });
    tbl.appendChild(body);
    box.appendChild(tbl);
    if (ex.n_steps[i] === 0) box.appendChild(h('p', { cls: 'note', text: 'This trace has no steps.' }));
    return box;
  }
  function samplesRow(run, idx, span) {
    var s = run.samples, yes = 0, no = 0, na = 0, unk = 0;
    var list = h('ol');
    idx.forEach(function (j) {
      var c = s.consistent[j];
      if (c === 1) yes++; else if (c === 0) no++; else if (c === 0.5) na++; else unk++;
      var badge = c === 1 ? h('span', { cls: 'verdict yes', text: 'consistent' })
        : c === 0 ? h('span', { cls: 'verdict no', text: 'not consistent' })
        : c === 0.5 ? h('span', { cls: 'verdict unk', text: 'N/A (0.5)' })
          : h('span', { cls: 'verdict unk', text: s.reply[j] == null ? 'empty (0.5)' : 'unparsed (0.5)' });
      list.appendChild(h('li', { cls: 'sample' }, [badge, s.text[j] || '(empty paragraph)',
        s.reply[j] == null ? null : h('span', { cls: 'reply', text: 'judge: ' + JSON.stringify(s.reply[j]) })]));
    });
    var det = h('details', null, [h('summary', {
      text: 'sampling: ' + idx.length + ' continuations from this step\'s prefix; judge: ' + yes +
        ' consistent, ' + no + ' not, ' + na + ' N/A, ' + unk + ' unparsed'
    }), list]);
    return h('tr', { cls: 'samples' }, [h('td'), h('td', { colspan: String(span - 1) }, [det])]);
  }

  /* ---- list (run page and compare page share it) ------------------------------------------ */
  function makeList(cfg) {
    // cfg: n, columns [{label, group, get(i) -> sortable, cell(i) -> td}], search(i) -> text,
    //      filter {label, options: [[value, label, pred(i)]]}, open(i), key(i); a column's
    //      key in the URL (sort=) is "group.label" ("deepconf.C") or its label ("steps")
    cfg.columns.forEach(function (c) { c.key = (c.group != null ? c.group + '.' : '') + c.label; });
    var init = params();
    var state = { sort: null, dir: 1, page: 0, query: (init.get('find') || '').toLowerCase(), filt: [0] };
    var order = [];
    var info = h('span', { cls: 'info' });
    var search = h('input', { type: 'search', placeholder: 'filter by id or question text' });
    search.value = init.get('find') || '';
    search.addEventListener('input', function () { state.query = search.value.toLowerCase(); state.page = 0; update(); });
    var controls = h('div', { cls: 'controls' }, [search]);
    var filter = cfg.filter;
    state.filt = Math.max(0, filter.options.map(function (o) { return o[0]; }).indexOf(init.get('show')));
    var sel = h('select', null, filter.options.map(function (o, j) { return h('option', { value: String(j), text: o[1] }); }));
    sel.value = String(state.filt);
    sel.addEventListener('change', function () { state.filt = +sel.value; state.page = 0; update(); });
    controls.appendChild(h('label', null, [filter.label + ' ', sel]));
    cfg.columns.forEach(function (c, k) {
      if (c.key === init.get('sort')) { state.sort = k; state.dir = init.get('dir') === 'desc' ? -1 : 1; }
    });
    var prev = h('button', { text: '◀', onclick: function () { state.page--; draw(); } });
    var next = h('button', { text: '▶', onclick: function () { state.page++; draw(); } });
    controls.appendChild(h('span', { cls: 'pager' }, [prev, next]));
    controls.appendChild(info);
    controls.appendChild(scaleKey());
    var table = h('table', { cls: 'list' }), thead = h('thead'), tbody = h('tbody');
    var groups = h('tr'), heads = h('tr'), lastGroup = null, ths = [];
    cfg.columns.forEach(function (c, k) {
      if (c.group !== lastGroup || c.group == null) {
        var span = 0;
        for (var j = k; j < cfg.columns.length && cfg.columns[j].group === c.group && c.group != null; j++) span++;
        if (c.group != null) groups.appendChild(h('th', { colspan: String(span), cls: 'est', text: c.group }));
        else groups.appendChild(h('th'));
        lastGroup = c.group;
      }
      var th = h('th', { title: c.title || ('sort by ' + c.label), text: c.label });
      th.addEventListener('click', function () {
        if (state.sort === k) state.dir = -state.dir; else { state.sort = k; state.dir = c.desc ? -1 : 1; }
        state.page = 0; update();
      });
      ths.push(th); heads.appendChild(th);
    });
    thead.appendChild(groups); thead.appendChild(heads);
    table.appendChild(thead); table.appendChild(tbody);
    var wrap = h('div', null, [controls, h('div', { cls: 'list-wrap' }, [table])]);
    var openKey = null;
    function update() {
      order = [];
      var pred = filter.options[state.filt][2];
      for (var i = 0; i < cfg.n; i++) {
        if (state.query && cfg.search(i).indexOf(state.query) < 0) continue;
        if (!pred || pred(i)) order.push(i);
      }
      if (state.sort != null) {
        var get = cfg.columns[state.sort].get, dir = state.dir;
        var keyed = order.map(function (i) { return [get(i), i]; });
        keyed.sort(function (a, b) {
          var x = a[0], y = b[0];
          if (x == null || (typeof x === 'number' && isNaN(x))) return (y == null) ? a[1] - b[1] : 1;
          if (y == null || (typeof y === 'number' && isNaN(y))) return -1;
          return (x < y ? -dir : x > y ? dir : a[1] - b[1]);
        });
        order = keyed.map(function (p) { return p[1]; });
      }
      ths.forEach(function (th, k) { th.className = state.sort === k ? (state.dir > 0 ? 'sorted-asc' : 'sorted-desc') : ''; });
      setParams({
        sort: state.sort == null ? null : cfg.columns[state.sort].key, dir: state.sort == null ? null : (state.dir > 0 ? 'asc' : 'desc'),
        show: state.filt ? filter.options[state.filt][0] : null, find: search.value
      }, true);
      draw();
    }
    function draw() {
      var pages = Math.max(1, Math.ceil(order.length / PAGE));
      state.page = Math.max(0, Math.min(state.page, pages - 1));
      var a = state.page * PAGE, b = Math.min(order.length, a + PAGE);
      tbody.textContent = '';
      var frag = document.createDocumentFragment();
      for (var p = a; p < b; p++) {
        var i = order[p];
        var tr = h('tr', { 'data-key': cfg.key(i) });
        if (cfg.key(i) === openKey) tr.className = 'open';
        cfg.columns.forEach(function (c) { tr.appendChild(c.cell(i)); });
        tr.tabIndex = 0;  // rows open with Enter as well as a click
        tr.addEventListener('click', (function (i) { return function () { cfg.open(i); }; })(i));
        tr.addEventListener('keydown', (function (i) { return function (e) { if (e.key === 'Enter') cfg.open(i); }; })(i));
        frag.appendChild(tr);
      }
      tbody.appendChild(frag);
      info.textContent = (order.length ? (a + 1) + '–' + b : '0') + ' of ' + order.length +
        (order.length < cfg.n ? ' (filtered from ' + cfg.n + ')' : '') + ' · page ' + (state.page + 1) + '/' + pages;
      prev.disabled = state.page === 0; next.disabled = state.page >= pages - 1;
      CHECK.list_total = order.length; CHECK.list_rows = b - a;
    }
    function mark(key) {
      openKey = key;
      Array.prototype.forEach.call(tbody.children, function (tr) {
        tr.className = tr.getAttribute('data-key') === key ? 'open' : '';
      });
    }
    update();
    return { el: wrap, mark: mark };
  }

  function textCell(s, cls) { return h('td', { cls: cls || '', text: s == null ? '–' : String(s), title: s == null ? '' : String(s) }); }

  /* ---- run page --------------------------------------------------------------------------- */
  function runPage(run) {
    var ex = run.examples, names = run.estimators, n = ex.id.length;
    var lower = ex.question.map(function (q, i) { return (ex.id[i] + ' ' + q).toLowerCase(); });
    var cols = [
      { label: 'id', get: function (i) { return ex.id[i]; }, cell: function (i) { return textCell(ex.id[i], 'id'); } },
      { label: 'correct', desc: true, get: function (i) { return ex.correct[i] ? 1 : 0; }, cell: function (i) { return h('td', null, [correctMark(ex.correct[i], ex.prediction[i])]); } },
      { label: 'steps', desc: true, get: function (i) { return ex.n_steps[i]; }, cell: function (i) { return h('td', { cls: 'v', text: String(ex.n_steps[i]) }); } },
      { label: 'answer', get: function (i) { return ex.prediction[i]; }, cell: function (i) { return textCell(ex.prediction[i], 'id'); } },
      { label: 'question', get: function (i) { return ex.question[i]; }, cell: function (i) { return textCell(ex.question[i], 'q'); } }
    ];
    names.forEach(function (nm) {
      cols.push({ label: 'C', group: nm, desc: true, title: 'trace confidence of ' + nm + ' (sort)', get: function (i) { return ex.conf[nm][i]; }, cell: function (i) { return valueCell(ex.conf[nm][i], 'trace C ' + nm); } });
      cols.push({ label: 'F', group: nm, desc: true, title: 'trace faithfulness of ' + nm + ' (sort)', get: function (i) { return ex.faith[nm][i]; }, cell: function (i) { return valueCell(ex.faith[nm][i], 'trace F ' + nm); } });
    });
    var index = {}; ex.id.forEach(function (id, i) { index[id] = i; });
    var detail = h('div', { id: 'trace' });
    var list = makeList({
      n: n, columns: cols, key: function (i) { return ex.id[i]; },
      search: function (i) { return lower[i]; },
      filter: { label: 'show', options: [['all', 'all'], ['correct', 'correct', function (i) { return ex.correct[i]; }],
        ['wrong', 'wrong', function (i) { return !ex.correct[i]; }], ['none', 'no answer', function (i) { return ex.prediction[i] === null; }]] },
      open: function (i) { setParams({ ex: ex.id[i] }); }
    });
    root.appendChild(list.el);
    root.appendChild(detail);
    function route() {
      var id = params().get('ex');
      if (id == null) return;
      var i = index[id];
      detail.textContent = '';
      if (i === undefined) { detail.appendChild(h('p', { cls: 'note', text: 'No example with id ' + id + ' in this run.' })); CHECK.opened = null; return; }
      var t = performance.now();
      detail.appendChild(renderTrace(run, i, false));
      list.mark(id);
      CHECK.opened = id; CHECK.open_ms = performance.now() - t;
      CHECK.steps_rendered = detail.querySelectorAll('tr.step').length;
      CHECK.step_values = detail.querySelectorAll('tr.step td.v[data-v]').length;
      CHECK.samples_rendered = detail.querySelectorAll('li.sample').length;
      detail.scrollIntoView();
      writeCheck();
    }
    window.addEventListener('hashchange', route);
    CHECK.mode = 'run'; CHECK.examples = n;
    route();
  }

  /* ---- compare page ----------------------------------------------------------------------- */
  function comparePage() {
    var runs = DATA.runs, labels = DATA.labels;
    var present = []; runs.forEach(function (r, j) { if (r) { r.title = labels[j]; present.push(j); } });
    CHECK.mode = 'compare'; CHECK.runs = present.length; CHECK.examples = 0;
    if (!present.length) { root.appendChild(h('p', { cls: 'note', text: 'No run has its tables here.' })); return; }
    var ids = [], where = {};
    present.forEach(function (j) {
      runs[j].examples.id.forEach(function (id, i) {
        if (!(id in where)) { where[id] = {}; ids.push(id); }
        where[id][j] = i;
      });
    });
    var names = [];
    present.forEach(function (j) { runs[j].estimators.forEach(function (n) { if (names.indexOf(n) < 0) names.push(n); }); });
    var first = present[0];
    function q(i) { var id = ids[i], j = present.filter(function (j) { return where[id][j] !== undefined; })[0]; return runs[j].examples.question[where[id][j]]; }
    function corr(i, j) { var k = where[ids[i]][j]; return k === undefined ? null : runs[j].examples.correct[k]; }
    function conf(i, j, n) { var k = where[ids[i]][j]; return (k === undefined || !runs[j].examples.conf[n]) ? null : runs[j].examples.conf[n][k]; }
    var flipped = [], moved = [];
    for (var i = 0; i < ids.length; i++) {
      var f = false, m = null;
      present.forEach(function (j) {
        if (j === first) return;
        var a = corr(i, first), b = corr(i, j);
        if (a !== null && b !== null && a !== b) f = true;
        names.forEach(function (n) {
          var x = conf(i, first, n), y = conf(i, j, n);
          if (x != null && y != null && (m === null || Math.abs(y - x) > Math.abs(m))) m = y - x;
        });
      });
      flipped.push(f); moved.push(m);
    }
    var lower = ids.map(function (id, i) { return (id + ' ' + q(i)).toLowerCase(); });
    var cols = [
      { label: 'id', get: function (i) { return ids[i]; }, cell: function (i) { return textCell(ids[i], 'id'); } },
      { label: 'question', get: function (i) { return q(i); }, cell: function (i) { return textCell(q(i), 'q'); } },
      { label: 'flipped', desc: true, get: function (i) { return flipped[i] ? 1 : 0; }, cell: function (i) { return h('td', { cls: flipped[i] ? 'bad' : '', text: flipped[i] ? 'flipped' : '' }); } },
      { label: 'Δ C', desc: true, title: 'largest change of a trace confidence vs the first run', get: function (i) { return moved[i] == null ? null : Math.abs(moved[i]); },
        cell: function (i) { return h('td', { cls: 'v', text: moved[i] == null ? '–' : (moved[i] > 0 ? '+' : '') + moved[i].toFixed(2) }); } }
    ];
    present.forEach(function (j) {
      cols.push({ label: 'ok', group: labels[j], desc: true, get: function (i) { var c = corr(i, j); return c === null ? null : +c; },
        cell: function (i) { var k = where[ids[i]][j]; return h('td', null, [k === undefined ? '–' : correctMark(runs[j].examples.correct[k], runs[j].examples.prediction[k])]); } });
      names.forEach(function (n) {
        cols.push({ label: 'C ' + n.slice(0, 5), group: labels[j], desc: true, title: 'trace confidence of ' + n + ' in ' + labels[j],
          get: function (i) { return conf(i, j, n); }, cell: function (i) { return valueCell(conf(i, j, n), labels[j] + ' trace C ' + n); } });
      });
    });
    var detail = h('div', { id: 'trace' });
    var index = {}; ids.forEach(function (id, i) { index[id] = i; });
    var list = makeList({
      n: ids.length, columns: cols, key: function (i) { return ids[i]; },
      search: function (i) { return lower[i]; },
      filter: { label: 'show', options: [['all', 'all questions'], ['changed', 'changed (flipped or |Δ C| ≥ 0.1)', function (i) { return flipped[i] || (moved[i] != null && Math.abs(moved[i]) >= 0.1); }],
        ['flipped', 'correctness flipped', function (i) { return flipped[i]; }]] },
      open: function (i) { setParams({ q: ids[i] }); }
    });
    root.appendChild(list.el); root.appendChild(detail);
    function route() {
      var id = params().get('q');
      if (id == null) return;
      var i = index[id];
      detail.textContent = '';
      if (i === undefined) { detail.appendChild(h('p', { cls: 'note', text: 'No question with id ' + id + '.' })); return; }
      detail.appendChild(h('h3', { text: id }));
      detail.appendChild(h('div', { cls: 'question', text: q(i) }));
      var side = h('div', { cls: 'side' });
      present.forEach(function (j) {
        var k = where[id][j];
        side.appendChild(k === undefined ? h('div', null, [h('h4', { text: labels[j] + ': not in this run' })])
          : h('div', null, [renderTrace(runs[j], k, true)]));
      });
      detail.appendChild(side);
      list.mark(id);
      CHECK.opened = id;
      CHECK.steps_rendered = detail.querySelectorAll('tr.step').length;
      CHECK.step_values = detail.querySelectorAll('tr.step td.v[data-v]').length;
      detail.scrollIntoView();
      writeCheck();
    }
    window.addEventListener('hashchange', route);
    CHECK.examples = ids.length;
    CHECK.flipped = flipped.filter(Boolean).length;
    route();
  }

  try {
    if (DATA.compare) comparePage(); else runPage(DATA);
  } catch (e) {
    CHECK.errors.push(String(e && e.stack || e));
    throw e;
  } finally {
    CHECK.ready = true;
    CHECK.load_ms = performance.now() - T0;
    CHECK.page_width = document.documentElement.scrollWidth;
    CHECK.view_width = document.documentElement.clientWidth;
    CHECK.nav_ms = performance.now();
    writeCheck();
  }
})();
