-- Bodies are stored as sent, uncompressed: compressing every large body on the way in (pglz)
-- cost more CPU than the disk it saved, on the path every delivery takes before its 2xx.
ALTER TABLE deliveries ALTER COLUMN body SET STORAGE EXTERNAL;
ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
