-- POST /create-loan, a different customer per request: CUSTOMER_IDS are fresh customers registered
-- for this run (income 500,000, so each first loan is approved). Thread t of THREADS takes
-- CUSTOMER_IDS[t], CUSTOMER_IDS[t + THREADS], ... so no two requests share a customer until the list
-- runs out; past that it wraps around, and `wrapped` counts the requests that reused a customer.
local headers = { ["Content-Type"] = "application/json" }
local sent = 0
wrapped = 0

request = function()
   local index = thread_id + sent * THREADS
   sent = sent + 1
   if index > #CUSTOMER_IDS then
      wrapped = wrapped + 1
      index = (index - 1) % #CUSTOMER_IDS + 1
   end
   local body = string.format(
      '{"customer_id": %d, "loan_amount": 100000, "interest_rate": 14, "tenure": 12}', CUSTOMER_IDS[index])
   return wrk.format("POST", "/create-loan", headers, body)
end

done = function(summary, latency, requests)
   local total = 0
   for _, thread in ipairs(threads) do
      total = total + (thread:get("wrapped") or 0)
   end
   io.write(string.format("create-loan requests that reused a customer: %d\n", total))
end
