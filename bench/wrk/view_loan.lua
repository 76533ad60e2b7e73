-- GET /view-loan/{loan_id} for a random existing loan: LOAN_IDS is the list from readmodel.loans.
request = function()
   return wrk.format("GET", "/view-loan/" .. LOAN_IDS[math.random(1, #LOAN_IDS)])
end
