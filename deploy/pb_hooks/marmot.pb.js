// marmot's read-your-writes for PocketBase (docs/read-your-writes.md),
// installed into pb_hooks/ by the image's entrypoint.
//
// - GET /api/marmot/bookmark: a bookmark of every write this Machine
//   committed so far, in the X-Marmot-Bookmark header and the JSON body.
// - Any request carrying X-Marmot-Bookmark waits (at most 5 s) until this
//   Machine has applied the writes it names, then runs; 503 if it has not.
// - Every response names its Machine in X-Marmot-Machine, for the
//   fly-force-instance-id header of the bookmark request.
//
// PocketBase runs each handler in a context of its own: a handler sees
// nothing declared outside it, hence the repetition.

routerUse((e) => {
  const machine = $os.getenv("FLY_MACHINE_ID");
  if (machine) e.response.header().set("X-Marmot-Machine", machine);
  const bookmark = e.request.header.get("X-Marmot-Bookmark");
  if (!bookmark) return e.next();
  const token = $os.getenv("MARMOT_HTTP_TOKEN");
  const res = $http.send({
    url: $os.getenv("MARMOT_HTTP_URL") + "/wait?timeout=5&bookmark=" +
      encodeURIComponent(bookmark),
    method: "GET",
    headers: token ? { authorization: "Bearer " + token } : {},
    timeout: 10,
  });
  if (res.statusCode === 200) return e.next();
  return e.json(res.statusCode === 400 ? 400 : 503, {
    status: res.statusCode === 400 ? 400 : 503,
    message: "marmot: " + ((res.json && res.json.error) || res.statusCode),
    data: {},
  });
});

routerAdd("GET", "/api/marmot/bookmark", (e) => {
  const token = $os.getenv("MARMOT_HTTP_TOKEN");
  const res = $http.send({
    url: $os.getenv("MARMOT_HTTP_URL") + "/bookmark",
    method: "GET",
    headers: token ? { authorization: "Bearer " + token } : {},
    timeout: 10,
  });
  if (res.statusCode === 200) {
    e.response.header().set("X-Marmot-Bookmark", res.json.bookmark);
  }
  return e.json(res.statusCode, res.json);
});
