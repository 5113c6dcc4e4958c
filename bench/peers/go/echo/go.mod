module weftecho

go 1.19
