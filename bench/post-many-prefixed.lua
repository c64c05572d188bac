-- wrk script: the many-label load of ../shared/bench/post-many.lua ("signature<TAB>body" lines
-- of MANY_FILE, one label each, cycled), with every X-Labelbox-Id carrying PREFIX. Two wrk
-- processes driving two replicas of one database use different prefixes, so that they never
-- send the same delivery id (a repeated id would be a duplicate, stored once, and would make
-- the two look slower than they are). ../shared is not ours to edit, hence this variant.
local prefix = os.getenv("PREFIX") or "p"
local items = {}
for line in io.lines(os.getenv("MANY_FILE")) do
  local sig, body = line:match("^([^\t]+)\t(.*)$")
  items[#items + 1] = { sig, body }
end
local n = 0
request = function()
  n = n + 1
  local it = items[(n % #items) + 1]
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["X-Hub-Signature"] = it[1],
    ["X-Labelbox-Event"] = "LABEL_UPDATED",
    ["X-Labelbox-Id"] = string.format("c%s%019d", prefix, n),
  }, it[2])
end
