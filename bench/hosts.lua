-- wrk script: each request gets a Host picked at random among BENCH_TOOLS tools
-- (tool<i>.toolforge.org; BENCH_TOOLS=1 -> always tool1). Requests are pre-formatted
-- in init(), so random and single-host runs cost wrk the same per request.
-- Unlike a bare wrk.format, it sends a User-Agent: the proxy refuses requests
-- without one (SPEC §3 step 3).
local n = tonumber(os.getenv("BENCH_TOOLS") or "1")
local legacy = os.getenv("BENCH_LEGACY") == "1"   -- tools.wmflabs.org/<tool>/ form
local reqs, threads = {}, 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  math.randomseed(os.time() * 100 + (tid or 0))
  for i = 1, n do
    if legacy then
      reqs[i] = wrk.format("GET", "/tool" .. i .. "/", { Host = "tools.wmflabs.org", ["User-Agent"] = "wrk" })
    else
      reqs[i] = wrk.format("GET", "/", { Host = "tool" .. i .. ".toolforge.org", ["User-Agent"] = "wrk" })
    end
  end
end

function request()
  return reqs[math.random(n)]
end
