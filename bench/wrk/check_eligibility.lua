-- POST /check-eligibility for a random existing customer (1..300), 100,000 over 12 months at 12%.
local headers = { ["Content-Type"] = "application/json" }

request = function()
   local body = string.format(
      '{"customer_id": %d, "loan_amount": 100000, "interest_rate": 12, "tenure": 12}', math.random(1, 300))
   return wrk.format("POST", "/check-eligibility", headers, body)
end
