-- The request id of the HTTP request that delivered it (`X-Request-Id` as a proxy sent it, or
-- one made by labelhook), so that log lines of later handler attempts, in another task or on
-- another replica, and the console carry it too. NULL for deliveries stored before.
ALTER TABLE deliveries ADD COLUMN request_id TEXT;
