-- wrk script: signed LABEL_UPDATED deliveries cycling over the labels of BODIES_FILE (one
-- "sha1=<hex>\t<body>" line per label, from bench/make_bodies.py), each with a new delivery id.
local bodies = {}
for line in io.lines(os.getenv("BODIES_FILE")) do
  local sig, body = line:match("^(%S+)\t(.*)$")
  bodies[#bodies + 1] = { sig = sig, body = body }
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Labelbox-Event"] = "LABEL_UPDATED"
local n = 0
request = function()
  n = n + 1
  local b = bodies[(n % #bodies) + 1]
  wrk.headers["X-Hub-Signature"] = b.sig
  wrk.headers["X-Labelbox-Id"] = string.format("csus%021d", n)
  return wrk.format(nil, nil, nil, b.body)
end
