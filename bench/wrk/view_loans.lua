-- GET /view-loans/{customer_id} for a random existing customer (1..300).
request = function()
   return wrk.format("GET", "/view-loans/" .. math.random(1, 300))
end
