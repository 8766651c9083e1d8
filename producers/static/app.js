// The operator's page. Plain JavaScript, no build step: Leaflet draws the map, everything else is the DOM.
// The token lives in sessionStorage only and travels as "Authorization: Bearer"; nothing here puts it in a URL.
// Text from the server is always set with textContent, never as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "crisiswatch.operatorToken";
  const $ = (id) => document.getElementById(id);
  const COUNTS = ["inside", "near", "warned", "delivered", "safe", "need_help", "unreached", "escalated"];

  let map = null;
  let crisisLayers = new Map();   // crisis_id -> {version, group}
  let rows = new Map();           // crisis_id -> <tr>
  let crises = new Map();         // crisis_id -> crisis as the overview sent it
  let citizensLayer = null;       // the points of the opened crisis
  let draftLayer = null;          // the area being drawn or pasted
  let opened = null;              // crisis_id whose citizens are shown
  let editing = null;             // crisis_id the form updates; null: the form declares a new one
  let drawing = null;             // the vertices [lat, lon] while drawing, else null
  let timer = null;
  let firstOverview = true;

  // --- talking to the API -------------------------------------------------------------------

  class Refused extends Error {
    constructor(status, body, retryAfter) {
      const reason = body && body.reason ? body.reason : "HTTP " + status;
      super(body && body.field ? reason + " (" + body.field + ")" : reason);
      this.status = status;
      this.retryAfter = Number(retryAfter) || 5;  // seconds; a 429 or 503 says how long to wait
    }
  }

  async function api(method, path, body) {
    const headers = { "Authorization": "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
    });
    let parsed = null;
    try { parsed = await response.json(); } catch (e) { parsed = null; }
    if (!response.ok) throw new Refused(response.status, parsed, response.headers.get("Retry-After"));
    return parsed;
  }

  // --- logging in and out -------------------------------------------------------------------

  async function logIn(event) {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    $("login-error").textContent = "";
    try {
      const overview = await api("GET", "v1/operator/overview");
      showMain();
      render(overview);
      schedule(overview.refresh_s);
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("login-error").textContent = e.status === 401 || e.status === 403 ? "This token is not an operator token." : e.message;
    }
  }

  function logOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(timer);
    $("main").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
  }

  function showMain() {
    $("login").hidden = true;
    $("main").hidden = false;
    if (map === null) makeMap();
    map.invalidateSize();
  }

  // --- the map ------------------------------------------------------------------------------

  function makeMap() {
    map = L.map("map", { worldCopyJump: false, attributionControl: false, minZoom: 1, maxZoom: 14 });
    map.fitBounds([[-55, -170], [75, 175]]);
    L.control.scale({ imperial: false }).addTo(map);
    L.control.attribution({ prefix: false }).addAttribution("Leaflet · Natural Earth").addTo(map);
    fetch("operator/static/countries.geojson").then((r) => r.json()).then((countries) => {
      L.geoJSON(countries, { style: { className: "country" }, interactive: false }).addTo(map).bringToBack();
    });
    map.on("click", (event) => { if (drawing !== null) addVertex(event.latlng); });
  }

  function crisisLayer(crisis) {
    const severity = "severity-" + crisis.severity;
    const group = L.featureGroup();
    if (crisis.band) L.geoJSON(crisis.band, { style: { className: "crisis-band " + severity }, interactive: false }).addTo(group);
    const area = L.geoJSON(crisis.geometry, { style: { className: "crisis-area " + severity } }).addTo(group);
    area.on("click", (event) => { if (drawing === null) { L.DomEvent.stop(event); openCrisis(crisis.crisis_id); } });
    area.bindTooltip(() => tooltip(crises.get(crisis.crisis_id) || crisis), { sticky: true });
    return group;
  }

  function tooltip(crisis) {
    const box = document.createElement("div");
    const title = document.createElement("strong");
    title.textContent = crisis.title;
    const counts = document.createElement("div");
    counts.textContent = crisis.counts.inside + " inside · " + crisis.counts.near + " near (" + crisis.buffer_km + " km)";
    box.append(title, counts);
    return box;
  }

  // --- rendering the overview ---------------------------------------------------------------

  function render(overview) {
    const seen = new Set();
    for (const crisis of overview.crises) {
      seen.add(crisis.crisis_id);
      crises.set(crisis.crisis_id, crisis);
      const drawn = crisisLayers.get(crisis.crisis_id);
      if (!drawn || drawn.version !== crisis.version) {
        if (drawn) map.removeLayer(drawn.group);
        crisisLayers.set(crisis.crisis_id, { version: crisis.version, group: crisisLayer(crisis).addTo(map) });
      }
      renderRow(crisis);
    }
    for (const id of [...crisisLayers.keys()]) {
      if (seen.has(id)) continue;
      map.removeLayer(crisisLayers.get(id).group);
      crisisLayers.delete(id);
      rows.get(id).remove();
      rows.delete(id);
      crises.delete(id);
      if (opened === id) closeCrisis();
      if (editing === id) newCrisis("That crisis is no longer active.");
    }
    if (firstOverview && crisisLayers.size > 0) {
      map.fitBounds(L.featureGroup([...crisisLayers.values()].map((d) => d.group)).getBounds(), { maxZoom: 9 });
    }
    firstOverview = false;
    renderFeed($("warnings"), overview.warnings, (w) => [w.emitted_at, w.kind + " " + w.citizen_id + " — " + w.title +
      countries(w.country_codes) + (w.kind === "near" ? " (" + w.distance_km.toFixed(1) + " km)" : "")]);
    renderFeed($("cases"), overview.cases, (c) => [c.updated_at, c.kind + " " + c.state + " " + c.citizen_id +
      (c.country ? " in " + c.country : "") + (c.assignee ? " → " + c.assignee : "")]);
    $("updated").textContent = "Updated " + new Date(overview.as_of).toLocaleTimeString() + " · refreshes every " +
      overview.refresh_s + " s";
    $("updated").classList.remove("stale");
  }

  function countries(codes) {
    return codes && codes.length ? " (" + codes.join(", ") + ")" : "";
  }

  function renderRow(crisis) {
    let row = rows.get(crisis.crisis_id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.crisisId = crisis.crisis_id;
      const name = document.createElement("td");
      const title = document.createElement("a");
      title.href = "#";
      title.className = "title";
      title.addEventListener("click", (e) => { e.preventDefault(); openCrisis(crisis.crisis_id); });
      const meta = document.createElement("span");
      meta.className = "meta";
      name.append(title, meta);
      row.append(name);
      for (const count of COUNTS) {
        const cell = document.createElement("td");
        cell.dataset.count = count;
        row.append(cell);
      }
      const actions = document.createElement("td");
      const edit = document.createElement("button");
      edit.type = "button";
      edit.className = "edit";
      edit.textContent = "Edit";
      edit.addEventListener("click", () => editCrisis(crisis.crisis_id));
      actions.append(edit);
      row.append(actions);
      rows.set(crisis.crisis_id, row);
      $("crises").tBodies[0].append(row);
    }
    row.querySelector(".title").textContent = crisis.title;
    row.querySelector(".meta").textContent = crisis.severity + countries(crisis.country_codes) + " · near " +
      crisis.buffer_km + " km";
    for (const count of COUNTS) row.querySelector('[data-count="' + count + '"]').textContent = crisis.counts[count];
  }

  function renderFeed(list, items, line) {
    list.replaceChildren(...items.map((item) => {
      const [when, text] = line(item);
      const entry = document.createElement("li");
      const time = document.createElement("time");
      time.dateTime = when;
      time.textContent = new Date(when).toLocaleTimeString();
      entry.append(time, document.createTextNode(text));
      return entry;
    }));
  }

  async function refresh() {
    try {
      const overview = await api("GET", "v1/operator/overview");
      render(overview);
      if (opened !== null) await showCitizens(opened);
      schedule(overview.refresh_s);
    } catch (e) {
      if (e.status === 401 || e.status === 403) { logOut("The token was refused; log in again."); return; }
      $("updated").textContent = "Not updated: " + e.message + " — retrying";
      $("updated").classList.add("stale");
      schedule(Math.min(Math.max(e.retryAfter || 5, 1), 60));
    }
  }

  function schedule(seconds) {
    clearTimeout(timer);
    timer = setTimeout(refresh, seconds * 1000);
  }

  // --- opening a crisis: its citizens inside and near as points -----------------------------

  async function openCrisis(id) {
    opened = id;
    for (const [rowId, row] of rows) row.classList.toggle("opened", rowId === id);
    await showCitizens(id);
  }

  async function showCitizens(id) {
    let found;
    try {
      found = await api("GET", "v1/crises/" + encodeURIComponent(id).replace(/%2F/g, "/") + "/citizens");
    } catch (e) {
      if (e.status === 404 || e.status === 409) { closeCrisis(); return; }
      throw e;
    }
    if (opened !== id) return;
    if (citizensLayer !== null) map.removeLayer(citizensLayer);
    citizensLayer = L.layerGroup(found.citizens.map((c) =>
      L.circleMarker([c.lat, c.lon], { radius: 5, className: "citizen citizen-" + c.zone })
        .bindTooltip(c.citizen_id + " · " + c.zone + (c.zone === "near" ? " " + c.distance_km.toFixed(1) + " km" : ""))
    )).addTo(map);
    const crisis = crises.get(id);
    $("opened").textContent = (crisis ? crisis.title : id) + ": " + found.citizens.length + " citizens inside or near shown" +
      (found.citizens.length >= found.limit ? " (the first " + found.limit + ")" : "") + ".";
  }

  function closeCrisis() {
    opened = null;
    if (citizensLayer !== null) map.removeLayer(citizensLayer);
    citizensLayer = null;
    for (const row of rows.values()) row.classList.remove("opened");
    $("opened").textContent = "";
  }

  // --- the form: declare, update, cancel ----------------------------------------------------

  function editCrisis(id) {
    const crisis = crises.get(id);
    editing = id;
    $("crisis-id").value = id;
    $("title").value = crisis.title;
    $("severity").value = crisis.severity;
    $("buffer-km").value = crisis.buffer_km;
    $("instruction").value = crisis.instruction;
    $("geometry").value = JSON.stringify(crisis.geometry);
    $("form-title").textContent = "Update " + crisis.title;
    $("submit-crisis").textContent = "Update";
    $("cancel-crisis").hidden = false;
    $("new-crisis").hidden = false;
    message("", "");
    previewPasted();
  }

  function newCrisis(text) {
    editing = null;
    $("crisis-form").reset();
    $("crisis-id").value = "";
    $("form-title").textContent = "Declare a crisis";
    $("submit-crisis").textContent = "Declare";
    $("cancel-crisis").hidden = true;
    $("new-crisis").hidden = true;
    clearDraft();
    message(text || "", "");
  }

  function message(text, kind) {
    $("form-message").textContent = text;
    $("form-message").className = kind;
  }

  function readGeometry() {
    const text = $("geometry").value.trim();
    if (!text) throw new Error("Draw the area on the map or paste a GeoJSON Polygon.");
    let geometry;
    try { geometry = JSON.parse(text); } catch (e) { throw new Error("The area is not JSON: " + e.message); }
    if (geometry && geometry.type === "Feature") geometry = geometry.geometry;
    return geometry;
  }

  async function submitCrisis(event) {
    event.preventDefault();
    if (drawing !== null) finishDrawing();
    let body;
    try {
      body = { title: $("title").value, severity: $("severity").value, geometry: readGeometry() };
    } catch (e) { message(e.message, "error"); return; }
    const buffer = $("buffer-km").value.trim();
    if (buffer !== "") body.buffer_km = Number(buffer);
    if ($("instruction").value.trim()) body.instruction = $("instruction").value.trim();
    if (editing !== null) body.crisis_id = editing;
    try {
      const crisis = await api("POST", "v1/crises", body);
      const verb = editing === null ? "Declared" : "Updated";
      newCrisis(verb + " " + crisis.crisis_id + "; it shows on the map once stored.");
      schedule(0.5);
    } catch (e) {
      if (e.status === 401 || e.status === 403) { logOut("The token was refused; log in again."); return; }
      message("Refused: " + e.message, "error");
    }
  }

  async function cancelCrisis() {
    const id = editing;
    if (id === null || !window.confirm("Cancel " + (crises.get(id) || { title: id }).title + "? Citizens get an all-clear.")) return;
    try {
      await api("POST", "v1/crises", { op: "cancel", crisis_id: id });
      newCrisis("Cancelled " + id + ".");
      schedule(0.5);
    } catch (e) {
      message("Refused: " + e.message, "error");
    }
  }

  // --- drawing: click to add corners, "Finish drawing" closes the polygon -------------------

  function startDrawing() {
    clearDraft();
    drawing = [];
    map.doubleClickZoom.disable();
    L.DomUtil.addClass(map.getContainer(), "drawing");
    $("draw").disabled = true;
    $("finish-drawing").disabled = false;
    message("Click the corners of the area on the map, then Finish drawing.", "");
  }

  function addVertex(latlng) {
    drawing.push([latlng.lat, latlng.lng]);
    showDraft(drawing, false);
  }

  function finishDrawing() {
    const corners = drawing;
    drawing = null;
    map.doubleClickZoom.enable();
    L.DomUtil.removeClass(map.getContainer(), "drawing");
    $("draw").disabled = false;
    $("finish-drawing").disabled = true;
    if (corners.length < 3) { clearDraft(); message("An area needs at least three corners.", "error"); return; }
    const ring = corners.map(([lat, lon]) => [round(lon), round(lat)]);
    ring.push(ring[0]);
    $("geometry").value = JSON.stringify({ type: "Polygon", coordinates: [ring] });
    showDraft(corners, true);
    message("", "");
  }

  function round(degrees) {
    return Math.round(degrees * 1e5) / 1e5;
  }

  function showDraft(corners, closed) {
    if (draftLayer !== null) map.removeLayer(draftLayer);
    draftLayer = L.layerGroup(corners.map((c) => L.circleMarker(c, { radius: 4, className: "draft-vertex", interactive: false })));
    if (corners.length > 1) {
      const shape = closed ? L.polygon(corners, { className: "draft", interactive: false })
        : L.polyline(corners, { className: "draft", interactive: false });
      draftLayer.addLayer(shape);
    }
    draftLayer.addTo(map);
  }

  function previewPasted() {
    if (draftLayer !== null) map.removeLayer(draftLayer);
    draftLayer = null;
    try {
      draftLayer = L.geoJSON(readGeometry(), {
        style: { className: "draft" }, interactive: false,
        pointToLayer: (feature, latlng) => L.circleMarker(latlng, { radius: 4, className: "draft-vertex" }),
      }).addTo(map);
    } catch (e) { /* not (yet) a geometry: nothing to preview; the API says why on submit */ }
  }

  function clearDraft() {
    if (draftLayer !== null) map.removeLayer(draftLayer);
    draftLayer = null;
  }

  // --- wiring -------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", logIn);
    $("logout").addEventListener("click", () => logOut(""));
    $("crisis-form").addEventListener("submit", submitCrisis);
    $("cancel-crisis").addEventListener("click", cancelCrisis);
    $("new-crisis").addEventListener("click", () => newCrisis(""));
    $("draw").addEventListener("click", startDrawing);
    $("finish-drawing").addEventListener("click", finishDrawing);
    $("geometry").addEventListener("change", previewPasted);
    if (sessionStorage.getItem(TOKEN_KEY)) {  // a reload in the same tab stays logged in
      api("GET", "v1/operator/overview").then((overview) => { showMain(); render(overview); schedule(overview.refresh_s); },
        () => logOut(""));
    }
  });
})();
