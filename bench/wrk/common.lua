-- Shared by the wrk scripts: a per-thread seed and a per-thread ID, set by setup().
-- bench/http_load.py prepends a line `BENCH_SEED = <n>` and, where needed, the ID lists.
local counter = 0
threads = {}

function setup(thread)
   counter = counter + 1
   thread:set("thread_id", counter)
   table.insert(threads, thread)
end

function init(args)
   math.randomseed(BENCH_SEED * 1000 + thread_id)
   math.random(); math.random(); math.random()  -- the first values after seeding are poorly mixed in LuaJIT
end
