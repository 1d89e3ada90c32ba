DROP TABLE job_deps;
DROP TRIGGER jobs_terminal_is_final;
DROP TABLE jobs;
DROP TABLE subjects;
DROP TABLE queues;
